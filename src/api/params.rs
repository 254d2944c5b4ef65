//! Checks of query parameters. Every value a list passes to the database is checked
//! here first, so a value outside the database's range (an instant PostgreSQL cannot
//! store, a NUL byte in a text, a name no row can have) answers `400 invalid_query`
//! instead of reaching PostgreSQL and coming back as a `500`.

use super::error::ApiError;
use crate::domain::names;
use axum::http::StatusCode;
use chrono::{DateTime, Datelike, Utc};
use std::collections::BTreeMap;

/// `400 invalid_query` with `message`.
pub fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
}

/// Whether `at` is an instant the API accepts: RFC 3339's years 0000 to 9999 (in UTC),
/// well inside PostgreSQL's `timestamptz` range (4713 BC to 294276 AD), which chrono
/// exceeds at both ends.
pub fn in_range(at: DateTime<Utc>) -> bool {
    (0..=9999).contains(&at.year())
}

/// Checks an instant filter such as `since`.
pub fn instant(field: &str, at: Option<DateTime<Utc>>) -> Result<Option<DateTime<Utc>>, ApiError> {
    match at {
        Some(t) if !in_range(t) => Err(invalid(format!(
            "{field}: must be between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z"
        ))),
        other => Ok(other),
    }
}

/// Checks a filter naming a zone or tenant: a DNS label, as every zone and tenant ID is.
pub fn label(field: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    if let Some(v) = &value {
        names::validate_label(field, v).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(value)
}

/// Checks a filter that takes one of `allowed` values.
pub fn one_of(
    field: &str,
    value: Option<String>,
    allowed: &[&str],
) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(invalid(format!(
            "{field}: must be one of {}",
            allowed.join(", ")
        ))),
        other => Ok(other),
    }
}

/// Parses a label selector `k=v[,k=v…]` into the JSON object the store matches. Keys
/// and values follow the rules of resource labels (`domain::names::validate_labels`),
/// and a key may appear once.
pub fn selector(text: &str) -> Result<serde_json::Value, ApiError> {
    let mut pairs = BTreeMap::new();
    for pair in text.split(',') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("label: {pair:?} is not key=value")))?;
        let (k, v) = (k.trim().to_owned(), v.trim().to_owned());
        if pairs.insert(k.clone(), v).is_some() {
            return Err(invalid(format!("label: {k:?} is given twice")));
        }
    }
    names::validate_labels(&pairs).map_err(|e| invalid(format!("label: {}", e.message)))?;
    Ok(serde_json::Value::Object(
        pairs
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect(),
    ))
}

/// `?kind=`: a registered kind (`400 invalid_query` otherwise, as for any value that
/// can match nothing).
pub fn registered_kind(
    types: &crate::registry::Registry,
    kind: Option<crate::domain::Kind>,
) -> Result<Option<crate::domain::Kind>, ApiError> {
    match kind {
        Some(k) if types.get(&k).is_none() => Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("kind: no resource type {k} is registered"),
        )),
        k => Ok(k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_stay_within_four_digit_years() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert!(in_range(at("0000-01-01T00:00:00Z")));
        assert!(in_range(at("9999-12-31T23:59:59.999999Z")));
        assert!(!in_range(at("-0001-12-31T23:59:59Z")));
        assert!(!in_range(at("9999-12-31T23:00:00-01:00")));
        assert!(!in_range(DateTime::<Utc>::MIN_UTC));
        assert!(!in_range(DateTime::<Utc>::MAX_UTC));
        assert_eq!(
            instant("since", Some(DateTime::<Utc>::MIN_UTC))
                .unwrap_err()
                .code,
            "invalid_query"
        );
    }

    #[test]
    fn selectors_follow_the_label_rules() {
        assert_eq!(
            selector("env=prod, team=db").unwrap(),
            serde_json::json!({"env": "prod", "team": "db"})
        );
        assert_eq!(selector("env=").unwrap(), serde_json::json!({"env": ""}));
        for bad in ["env", "=x", "Env=x", "env=a b", "env=\0", "env=a,env=b", ""] {
            assert_eq!(selector(bad).unwrap_err().code, "invalid_query", "{bad:?}");
        }
    }

    #[test]
    fn names_and_choices_are_checked() {
        assert!(label("zone", Some("zone-a".into())).is_ok());
        assert!(label("zone", None).is_ok());
        for bad in ["", "Zone", "a\0", "a/b"] {
            assert!(label("zone", Some(bad.into())).is_err(), "{bad:?}");
        }
        assert!(one_of("outcome", Some("denied".into()), &["allowed", "denied"]).is_ok());
        assert!(one_of("outcome", Some("x".into()), &["allowed", "denied"]).is_err());
    }
}
