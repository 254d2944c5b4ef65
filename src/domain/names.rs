//! Names of tenants, resources and zones: DNS labels, so they are safe in subjects,
//! hostnames and URLs alike.

use super::ValidationError;

/// The longest name accepted (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// Checks that `value` is a DNS label: 1–63 characters of `a-z`, `0-9` and `-`,
/// starting and ending with a letter or digit.
pub fn validate_label(field: &str, value: &str) -> Result<(), ValidationError> {
    let bad = |why: &str| {
        Err(ValidationError::new(
            "invalid_name",
            field,
            format!("{value:?} {why}; use 1-{MAX_NAME_LEN} characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
        ))
    };
    if value.is_empty() {
        return bad("is empty");
    }
    if value.len() > MAX_NAME_LEN {
        return bad("is too long");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("has a character that is not allowed");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return bad("starts or ends with '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web-1", "0", &"x".repeat(63)] {
            assert!(validate_label("name", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else_with_a_stable_code() {
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            "é",
            &"x".repeat(64),
            "a b",
        ] {
            let err = validate_label("name", bad).unwrap_err();
            assert_eq!(err.code, "invalid_name", "{bad}");
            assert_eq!(err.field, "name");
        }
    }
}
