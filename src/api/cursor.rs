//! Opaque cursors for keyset pagination. A cursor names the last row of a page by its
//! sort key, so pages stay stable while rows are inserted: new rows sort before the
//! cursor (lists are newest first) and never shift the rows after it.

use super::error::ApiError;
use super::wire::Page;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use uuid::Uuid;

fn bad_cursor() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
        "the cursor is not one this API returned",
    )
}

/// Encodes a `(created_at, id)` sort key.
pub fn encode_time_id(at: DateTime<Utc>, id: Uuid) -> String {
    hex::encode(format!("t:{}:{}", at.timestamp_micros(), id))
}

/// Decodes [`encode_time_id`].
pub fn decode_time_id(cursor: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let text = String::from_utf8(hex::decode(cursor).map_err(|_| bad_cursor())?)
        .map_err(|_| bad_cursor())?;
    let mut parts = text.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("t"), Some(micros), Some(id)) => {
            let micros: i64 = micros.parse().map_err(|_| bad_cursor())?;
            let at = DateTime::from_timestamp_micros(micros)
                .filter(|at| super::params::in_range(*at))
                .ok_or_else(bad_cursor)?;
            Ok((at, id.parse().map_err(|_| bad_cursor())?))
        }
        _ => Err(bad_cursor()),
    }
}

/// Encodes a sequence-number sort key.
pub fn encode_seq(seq: i64) -> String {
    hex::encode(format!("s:{seq}"))
}

/// Decodes [`encode_seq`].
pub fn decode_seq(cursor: &str) -> Result<i64, ApiError> {
    let text = String::from_utf8(hex::decode(cursor).map_err(|_| bad_cursor())?)
        .map_err(|_| bad_cursor())?;
    text.strip_prefix("s:")
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad_cursor)
}

/// Builds a page from `limit + 1` rows: the extra row only says there is a next page.
pub fn page<R, T>(
    mut rows: Vec<R>,
    limit: i64,
    key: impl Fn(&R) -> String,
    out: impl Fn(R) -> T,
) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more { rows.last().map(&key) } else { None };
    Page {
        items: rows.into_iter().map(out).collect(),
        next_cursor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_time_id(&encode_time_id(at, id)).unwrap(), (at, id));
        assert_eq!(decode_seq(&encode_seq(42)).unwrap(), 42);
        let far = DateTime::<Utc>::MIN_UTC.timestamp_micros();
        for bad in [
            "",
            "zz",
            &hex::encode("t:x:y"),
            &encode_seq(1),
            &hex::encode(format!("t:{far}:{id}")),
        ] {
            assert_eq!(decode_time_id(bad).unwrap_err().code, "invalid_cursor");
        }
        assert_eq!(
            decode_seq(&encode_time_id(at, id)).unwrap_err().code,
            "invalid_cursor"
        );
    }

    #[test]
    fn pages_know_whether_more_follow() {
        let p = page(vec![1, 2, 3], 2, |r| r.to_string(), |r| r);
        assert_eq!(p.items, vec![1, 2]);
        assert_eq!(p.next_cursor.as_deref(), Some("2"));
        let p = page(vec![1, 2], 2, |r| r.to_string(), |r| r);
        assert_eq!(p.next_cursor, None);
    }
}
