//! Webhook signing secrets at rest: sealed (AES-256-GCM) with a key from the
//! configuration (`WEBHOOK_SECRET_KEY`), so a read of the database alone (a dump, a
//! backup, a replica) does not give away the secrets that sign a tenant's deliveries.
//!
//! A sealed secret is stored as `sealed:v1:<base64(nonce ‖ ciphertext ‖ tag)>`, bound to
//! its endpoint's ID (the additional authenticated data), so a sealed value copied onto
//! another endpoint does not open. A stored value that is not sealed (a `whsec_…` secret
//! written while no key was configured) opens as itself, so a key can be configured on a
//! running installation: an endpoint's secret is sealed at its next rotation.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use uuid::Uuid;

/// Prefix of a sealed secret.
pub const SEALED_PREFIX: &str = "sealed:v1:";

/// The keys that seal and open webhook secrets: the current one, which seals and is
/// tried first, and optionally the one before it (`WEBHOOK_SECRET_KEY_PREVIOUS`), which
/// still opens, so the key itself can be rotated.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKeys {
    current: [u8; 32],
    previous: Option<[u8; 32]>,
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKeys(<redacted>)")
    }
}

/// Why a stored secret does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// It is sealed, but no key is configured.
    #[error("the secret is sealed but no WEBHOOK_SECRET_KEY is configured")]
    NoKey,
    /// No configured key opens it (another key, another endpoint, or altered).
    #[error("no configured WEBHOOK_SECRET_KEY opens the secret")]
    WrongKey,
}

/// Parses a key: 32 bytes, as base64 or as 64 hex digits.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| e.to_string())?
    } else {
        B64.decode(text)
            .map_err(|_| "neither 64 hex digits nor base64".to_owned())?
    };
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{} bytes; a key is 32 bytes", b.len()))
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes fit AES-256"))
}

impl SealKeys {
    /// Keys from their bytes.
    pub fn new(current: [u8; 32], previous: Option<[u8; 32]>) -> Self {
        Self { current, previous }
    }

    /// Seals `secret` of endpoint `id` with the current key and `nonce` (fresh random
    /// bytes: a nonce must never repeat under one key).
    pub fn seal(&self, id: Uuid, secret: &str, nonce: [u8; NONCE_LEN]) -> String {
        let mut data = secret.as_bytes().to_vec();
        key(&self.current)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut data,
            )
            .expect("a short secret seals");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{SEALED_PREFIX}{}", B64.encode(out))
    }

    fn open_with(k: &[u8; 32], id: Uuid, sealed: &[u8]) -> Option<String> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, data) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut data = data.to_vec();
        let plain = key(k)
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut data)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

/// Seals `secret` of endpoint `id` when there are keys; otherwise keeps it as it is.
pub fn seal(keys: Option<&SealKeys>, id: Uuid, secret: &str, nonce: [u8; NONCE_LEN]) -> String {
    match keys {
        Some(k) => k.seal(id, secret, nonce),
        None => secret.to_owned(),
    }
}

/// The secret in `stored` (of endpoint `id`): opened when sealed, as it is when not.
pub fn open(keys: Option<&SealKeys>, id: Uuid, stored: &str) -> Result<String, OpenError> {
    let Some(b64) = stored.strip_prefix(SEALED_PREFIX) else {
        return Ok(stored.to_owned());
    };
    let keys = keys.ok_or(OpenError::NoKey)?;
    let sealed = B64.decode(b64).map_err(|_| OpenError::WrongKey)?;
    std::iter::once(&keys.current)
        .chain(keys.previous.as_ref())
        .find_map(|k| SealKeys::open_with(k, id, &sealed))
        .ok_or(OpenError::WrongKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn a_sealed_secret_opens_with_its_key_and_endpoint_only() {
        let keys = SealKeys::new([1; 32], None);
        let id = Uuid::now_v7();
        let sealed = seal(Some(&keys), id, SECRET, [9; NONCE_LEN]);
        assert!(sealed.starts_with(SEALED_PREFIX), "{sealed}");
        assert!(!sealed.contains("MfKQ9r8G"), "{sealed}");
        assert_eq!(open(Some(&keys), id, &sealed).as_deref(), Ok(SECRET));
        let other = SealKeys::new([2; 32], None);
        assert_eq!(open(Some(&other), id, &sealed), Err(OpenError::WrongKey));
        let elsewhere = Uuid::now_v7();
        assert_eq!(
            open(Some(&keys), elsewhere, &sealed),
            Err(OpenError::WrongKey)
        );
        assert_eq!(open(None, id, &sealed), Err(OpenError::NoKey));
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert_eq!(open(Some(&keys), id, &altered), Err(OpenError::WrongKey));
        assert_eq!(
            open(Some(&keys), id, "sealed:v1:AAAA"),
            Err(OpenError::WrongKey)
        );
    }

    #[test]
    fn the_previous_key_still_opens_and_plain_secrets_stay_readable() {
        let id = Uuid::now_v7();
        let old = SealKeys::new([1; 32], None);
        let sealed = old.seal(id, SECRET, [3; NONCE_LEN]);
        let rotated = SealKeys::new([2; 32], Some([1; 32]));
        assert_eq!(open(Some(&rotated), id, &sealed).as_deref(), Ok(SECRET));
        assert_ne!(rotated.seal(id, SECRET, [3; NONCE_LEN]), sealed);
        assert_eq!(open(Some(&rotated), id, SECRET).as_deref(), Ok(SECRET));
        assert_eq!(open(None, id, SECRET).as_deref(), Ok(SECRET));
        assert_eq!(seal(None, id, SECRET, [0; NONCE_LEN]), SECRET);
    }

    #[test]
    fn keys_are_32_bytes_of_hex_or_base64() {
        assert_eq!(parse_key(&"ab".repeat(32)), Ok([0xab; 32]));
        assert_eq!(parse_key(&B64.encode([7u8; 32])), Ok([7; 32]));
        assert!(parse_key(&B64.encode([7u8; 16])).is_err());
        assert!(parse_key("not a key!").is_err());
        assert_eq!(
            format!("{:?}", SealKeys::new([5; 32], None)),
            "SealKeys(<redacted>)"
        );
    }
}
