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

/// The most labels one resource may carry.
pub const MAX_LABELS: usize = 32;

/// Checks a resource's labels: at most [`MAX_LABELS`]; keys 1–63 characters of `a-z`,
/// `0-9`, `.`, `_`, `-`, starting and ending with a letter or digit; values 0–63
/// characters of letters, digits, `.`, `_` and `-`.
pub fn validate_labels(
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            "invalid_label",
            "labels",
            format!("at most {MAX_LABELS} labels, got {}", labels.len()),
        ));
    }
    for (key, value) in labels {
        let field = format!("labels.{key}");
        let key_ok = !key.is_empty()
            && key.len() <= MAX_NAME_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && key
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if !key_ok {
            return Err(ValidationError::new(
                "invalid_label",
                field,
                "keys are 1-63 characters of a-z, 0-9, '.', '_' and '-', starting and ending with a letter or digit",
            ));
        }
        let value_ok = value.len() <= MAX_NAME_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !value_ok {
            return Err(ValidationError::new(
                "invalid_label",
                field,
                "values are 0-63 characters of letters, digits, '.', '_' and '-'",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked_key_by_key() {
        let ok: std::collections::BTreeMap<String, String> =
            [("env".into(), "prod".into()), ("team.db".into(), "".into())].into();
        assert!(validate_labels(&ok).is_ok());
        for (k, v) in [
            ("Env", "x"),
            ("-a", "x"),
            ("a", "has space"),
            ("a", &"v".repeat(64)),
            ("", "x"),
        ] {
            let bad = [(k.to_owned(), v.to_owned())].into();
            let err = validate_labels(&bad).unwrap_err();
            assert_eq!(err.code, "invalid_label", "{k}={v}");
        }
        let many = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(validate_labels(&many).unwrap_err().field, "labels");
    }

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
