//! Extractors: the authenticated caller, JSON bodies with clear errors, request metadata.

use super::error::ApiError;
use super::guard::Authn;
use super::request::RequestId;
use crate::audit::AuditSlot;
use crate::auth::Principal;
use crate::domain::resource_type::integral_numbers;
use crate::lifecycle::Audit;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

/// The authenticated caller, from `Authorization: Bearer <key>`.
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let unauthenticated =
            |msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", msg);
        match parts.extensions.get::<Authn>() {
            Some(Authn::Principal(p)) => Ok(Caller(p.clone())),
            Some(Authn::Invalid) => Err(unauthenticated(
                "the API key is unknown, revoked or expired",
            )),
            _ => Err(unauthenticated(
                "send an API key as `Authorization: Bearer <key>`",
            )),
        }
    }
}

/// Request metadata handlers pass on to operations.
pub struct Meta {
    /// `X-Request-Id`.
    pub request_id: String,
    /// W3C `traceparent`, if the client sent a well-formed one.
    pub traceparent: Option<String>,
    /// The request's audit entry, for a write to record in its transaction.
    pub audit: Option<AuditSlot>,
}

impl Meta {
    /// The audit entry, to be written with a change whose answer is `status`.
    pub fn audit(&self, status: StatusCode) -> Audit<'_> {
        self.audit.as_ref().map(|slot| (slot, status.as_u16()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Meta {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let traceparent = parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_traceparent(v))
            .map(str::to_owned);
        Ok(Meta {
            request_id,
            traceparent,
            audit: parts.extensions.get::<AuditSlot>().cloned(),
        })
    }
}

/// `version-traceid-parentid-flags`, lowercase hex, 2-32-16-2 digits.
fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2].iter().zip(&parts).all(|(n, p)| {
            p.len() == *n
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// A JSON body: `415` without a JSON content type, `400 malformed_json` when it does
/// not parse, `422 invalid_body` when it parses but has the wrong shape (missing or
/// unknown fields, wrong types).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(unsupported_media_type());
        }
        parse_json(&body(req, state).await?).map(JsonBody)
    }
}

/// An optional JSON body (an action's input): `None` when the body is empty or only
/// whitespace, whatever the headers say; otherwise as [`JsonBody`].
pub struct MaybeJsonBody(pub Option<serde_json::Value>);

impl<S: Send + Sync> FromRequest<S> for MaybeJsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = is_json(req.headers());
        let bytes = body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(MaybeJsonBody(None));
        }
        if !json {
            return Err(unsupported_media_type());
        }
        parse_json(&bytes).map(|v| MaybeJsonBody(Some(v)))
    }
}

/// Whether the request says its body is JSON.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false)
}

fn unsupported_media_type() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send the body as `Content-Type: application/json`",
    )
}

fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is too large (64 KiB at most)",
    )
}

/// The whole body: `413` at once when its declared length is over the limit (or as
/// soon as it grows past it), `408 request_timeout` when it does not arrive in time.
async fn body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > super::MAX_BODY_BYTES as u64) {
        return Err(payload_too_large());
    }
    let timed_out = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the body did not arrive within {} s",
                super::BODY_TIMEOUT.as_secs()
            ),
        )
    };
    // The whole body within the time, counted from its start (a timeout per chunk would
    // let a body that trickles in a byte at a time through).
    let read = tokio::time::timeout(super::BODY_TIMEOUT, Bytes::from_request(req, state));
    read.await.map_err(|_| timed_out())?.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            payload_too_large()
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text())
        }
    })
}

/// The deepest nesting a body may have.
pub const MAX_JSON_DEPTH: usize = 16;
/// The most values (objects, arrays, scalars) a body may hold.
pub const MAX_JSON_VALUES: usize = 2_000;

/// Depth and number of values of a JSON document.
fn shape(v: &serde_json::Value) -> (usize, usize) {
    use serde_json::Value;
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Array(items) => Box::new(items.iter()),
        Value::Object(map) => Box::new(map.values()),
        _ => return (1, 1),
    };
    children
        .map(shape)
        .fold((1, 1), |(d, n), (cd, cn)| (d.max(cd + 1), n + cn))
}

/// Whether a string (or an object key) in `v` holds NUL.
fn holds_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(holds_nul),
        serde_json::Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// `400 body_too_complex`.
fn too_complex() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "body_too_complex",
        format!(
            "bodies may nest {MAX_JSON_DEPTH} levels and hold {MAX_JSON_VALUES} values at most"
        ),
    )
}

/// Parses a JSON body, sorting syntax errors (`400 malformed_json`) from bodies too
/// deep or too large to be a real request (`400 body_too_complex`) and from shape
/// errors (`422 invalid_body`: every body is a JSON object). Whole numbers written as
/// decimals are read as integers ([`integral_numbers`]).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde_json's own recursion limit (128) stops pathological nesting while parsing
    // (and is the same refusal as the tighter limits below, which apply to what parsed).
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        if e.to_string().starts_with("recursion limit exceeded") {
            return too_complex();
        }
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let (depth, values) = shape(&value);
    if depth > MAX_JSON_DEPTH || values > MAX_JSON_VALUES {
        return Err(too_complex());
    }
    if !value.is_object() {
        // serde would read an array as a struct's fields in order: refuse it.
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "the body must be a JSON object",
        ));
    }
    integral_numbers(&mut value);
    if holds_nul(&value) {
        // PostgreSQL stores no NUL in `text` or `jsonb`: refuse it here, not with a 500.
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "strings may not hold NUL (U+0000)",
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            e.to_string(),
        )
    })
}

/// Headers of a write: `Idempotency-Key` and `If-Match`.
pub struct WriteHeaders {
    /// The client's idempotency key, 1–255 visible ASCII characters.
    pub idempotency_key: Option<String>,
    /// The version `If-Match` names (`"7"`); `None` when absent or `*`.
    pub if_match: Option<i64>,
}

impl<S: Send + Sync> FromRequestParts<S> for WriteHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let idempotency_key = match parts.headers.get("idempotency-key") {
            None => None,
            Some(v) => {
                let k = v.to_str().ok().filter(|k| {
                    !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic())
                });
                Some(
                    k.ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_idempotency_key",
                            "Idempotency-Key must be 1-255 visible ASCII characters",
                        )
                    })?
                    .to_owned(),
                )
            }
        };
        let if_match = match parts.headers.get(header::IF_MATCH) {
            None => None,
            Some(v) => {
                let text = v.to_str().unwrap_or("").trim();
                if text == "*" {
                    None
                } else {
                    let version = text
                        .trim_start_matches("W/")
                        .trim_matches('"')
                        .parse::<i64>()
                        .map_err(|_| {
                            ApiError::new(
                                StatusCode::PRECONDITION_FAILED,
                                "precondition_failed",
                                "If-Match names no version of this resource",
                            )
                        })?;
                    Some(version)
                }
            }
        };
        Ok(WriteHeaders {
            idempotency_key,
            if_match,
        })
    }
}

/// The fingerprint an idempotency key is bound to: method, path and body.
pub fn fingerprint(method: &str, path: &str, body: &serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b"\n");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(body.to_string().as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
        ));
        assert!(!is_traceparent(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
    }

    #[test]
    fn nul_in_a_string_is_an_invalid_body() {
        let e = parse_json::<serde_json::Value>(br#"{"display_name": "a\u0000b"}"#).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code.as_ref()), (422, "invalid_body"));
        let e = parse_json::<serde_json::Value>(br#"{"a\u0000": 1}"#).unwrap_err();
        assert_eq!(e.code, "invalid_body");
    }

    #[test]
    fn json_errors_are_sorted() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            a: u32,
        }
        assert_eq!(parse_json::<T>(b"{").unwrap_err().code, "malformed_json");
        assert_eq!(
            parse_json::<T>(b"{\"a\":1,\"b\":2}").unwrap_err().code,
            "invalid_body"
        );
        assert_eq!(
            parse_json::<T>(b"{\"a\":\"x\"}").unwrap_err().code,
            "invalid_body"
        );
        assert_eq!(parse_json::<T>(b"{\"a\":1}").unwrap().a, 1);
        let deep = format!("{}{}", "[".repeat(20), "]".repeat(20));
        assert_eq!(
            parse_json::<serde_json::Value>(deep.as_bytes())
                .unwrap_err()
                .code,
            "body_too_complex"
        );
        let wide = format!("[{}0]", "0,".repeat(3000));
        assert_eq!(
            parse_json::<serde_json::Value>(wide.as_bytes())
                .unwrap_err()
                .code,
            "body_too_complex"
        );
        // Past serde_json's own limit too: the same refusal, not a syntax error.
        let deeper = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert_eq!(
            parse_json::<serde_json::Value>(deeper.as_bytes())
                .unwrap_err()
                .code,
            "body_too_complex"
        );
    }

    #[test]
    fn a_body_is_an_object_not_the_fields_in_order() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            a: u32,
        }
        for body in [&b"[1]"[..], b"[[]]", b"1", b"\"a\"", b"null"] {
            let e = parse_json::<T>(body).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code.as_ref()), (422, "invalid_body"));
        }
    }

    #[test]
    fn whole_decimals_are_read_as_integers() {
        let v: serde_json::Value =
            parse_json(br#"{"n": 50.0, "e": 1e3, "f": 2.5, "deep": [{"m": -4.0}], "big": 1e300}"#)
                .unwrap();
        assert_eq!(v["n"], serde_json::json!(50));
        assert!(v["n"].is_i64() && v["e"].is_i64() && v["deep"][0]["m"].is_i64());
        assert_eq!(v["e"], serde_json::json!(1000));
        assert_eq!(v["f"], serde_json::json!(2.5));
        assert!(v["big"].is_f64(), "beyond i64: left as it is");
    }
}
