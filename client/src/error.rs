//! The client's errors: the API's own (with its code), transport, decoding, time-outs.

use crate::types::ErrorBody;
use serde_json::Value;
use std::time::Duration;

/// Everything a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gateway answered with an error: `{code, message, details, request_id}`.
    #[error("{code} ({status}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable machine-readable code (see the README's Errors table); `http_<status>`
        /// when the body was not the gateway's error shape (a proxy in between, say).
        code: String,
        /// Human-readable explanation.
        message: String,
        /// Structured details.
        details: Option<Value>,
        /// The request's ID, for the gateway's logs.
        request_id: Option<String>,
        /// What `Retry-After` asked for, if anything.
        retry_after: Option<Duration>,
    },
    /// The request did not get an answer (connection refused, reset, timed out).
    #[error("transport: {0}")]
    Transport(#[from] reqwest::Error),
    /// The answer was not what the route returns.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// `wait` gave up before the operation ended.
    #[error("timed out waiting for the operation")]
    TimedOut,
}

impl Error {
    /// The API error code, for API errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the same request may succeed later: `429` and `503`, where the gateway
    /// wrote nothing.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Api {
                status: 429 | 503,
                ..
            }
        )
    }

    /// The wait `Retry-After` asked for.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// An API error from a status, its `Retry-After` and body.
    pub(crate) fn from_answer(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Self {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(b) => Error::Api {
                status,
                code: b.code,
                message: b.message,
                details: b.details,
                request_id: b.request_id,
                retry_after,
            },
            Err(_) => Error::Api {
                status,
                code: format!("http_{status}"),
                message: String::from_utf8_lossy(body).chars().take(500).collect(),
                details: None,
                request_id: None,
                retry_after,
            },
        }
    }
}

/// Parses `Retry-After`: delay-seconds, or an HTTP date (then the time until it, at
/// least zero).
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = chrono::Utc
            .with_ymd_and_hms(2015, 10, 21, 7, 28, 0)
            .unwrap();
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        for bad in ["", "-1", "1.5", "soon"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn errors_decode_the_gateway_shape_and_anything_else() {
        let body = br#"{"code":"not_found","message":"resource not found","request_id":"r1","details":{"field":"id"}}"#;
        let e = Error::from_answer(404, None, body);
        assert_eq!(e.code(), Some("not_found"));
        assert_eq!(e.status(), Some(404));
        assert!(!e.is_retryable());
        match &e {
            Error::Api {
                request_id,
                details,
                ..
            } => {
                assert_eq!(request_id.as_deref(), Some("r1"));
                assert_eq!(details.as_ref().unwrap()["field"], "id");
            }
            other => panic!("{other:?}"),
        }
        let e = Error::from_answer(
            502,
            Some(Duration::from_secs(2)),
            b"<html>bad gateway</html>",
        );
        assert_eq!(e.code(), Some("http_502"));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert!(Error::from_answer(503, None, b"{}").is_retryable());
        assert!(Error::from_answer(429, None, b"").is_retryable());
        assert!(!Error::TimedOut.is_retryable());
    }
}
