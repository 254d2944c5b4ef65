//! Signed dispatches: how a worker knows that a message on `ops.<service>.<zone>` is one
//! the gateway produced, unaltered.
//!
//! The relay signs every message it publishes with an Ed25519 key
//! (`GATEWAY_DISPATCH_SIGNING_KEY`); workers hold the public halves they trust
//! (`WORKER_DISPATCH_PUBLIC_KEYS`) and check the signature before they read anything
//! else in the message. The signature covers, unambiguously (each part length-prefixed,
//! after a domain-separation tag):
//!
//! - the subject the message was published on (so a genuine message moved to another
//!   pool's subject fails),
//! - its `Nats-Msg-Id` (`{operation}.{n}`, which the dead-letter handler trusts),
//! - the body, byte for byte (the JSON [`crate::Dispatch`]: spec, input, deadline, …).
//!
//! Two headers carry it: [`KEY_HEADER`] names the signing key by its public half (so
//! keys rotate by adding the new public key to the workers, then switching the relay),
//! and [`SIGNATURE_HEADER`] holds the signature. Other headers (`X-Request-Id`,
//! `traceparent`) are not signed: they only label logs and reports.
//!
//! Keys are written as text: a signing key as `dsk_` + the 32-byte seed, a public key as
//! `dpk_` + its 32 bytes, both in unpadded URL-safe base64, so the two can never be
//! confused in a configuration.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey as Secret, VerifyingKey};
use std::fmt;

/// Header naming the key a dispatch was signed with (its public key, as text).
pub const KEY_HEADER: &str = "Gateway-Dispatch-Key";

/// Header carrying the dispatch's Ed25519 signature (unpadded URL-safe base64).
pub const SIGNATURE_HEADER: &str = "Gateway-Dispatch-Signature";

/// The header naming a JetStream message's ID, part of what is signed.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

const SIGNING_PREFIX: &str = "dsk_";
const PUBLIC_PREFIX: &str = "dpk_";
const DOMAIN: &[u8] = b"gateway-dispatch-v1";

/// The bytes a dispatch's signature covers.
fn signed_bytes(subject: &str, msg_id: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + subject.len() + msg_id.len() + body.len() + 24);
    for part in [DOMAIN, subject.as_bytes(), msg_id.as_bytes(), body] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn decode_32(text: &str, prefix: &str, what: &str) -> Result<[u8; 32], KeyError> {
    let body = text
        .trim()
        .strip_prefix(prefix)
        .ok_or_else(|| KeyError(format!("{what} must start with {prefix:?}")))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|e| KeyError(format!("{what} is not base64: {e}")))?;
    bytes
        .try_into()
        .map_err(|_| KeyError(format!("{what} must hold 32 bytes")))
}

/// A key that cannot be read; says why, never what the key was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// The relay's signing key. `Debug` never shows it.
#[derive(Clone)]
pub struct SigningKey(Secret);

impl SigningKey {
    /// The key whose seed is `seed` (32 random bytes for a new key).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(Secret::from_bytes(&seed))
    }

    /// Reads a key written by [`SigningKey::to_text`] (`dsk_…`).
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        decode_32(text, SIGNING_PREFIX, "a dispatch signing key").map(Self::from_seed)
    }

    /// The key as text, for a key file.
    pub fn to_text(&self) -> String {
        format!(
            "{SIGNING_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(self.0.to_bytes())
        )
    }

    /// Its public half, which workers trust.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The headers to add to the message published on `subject` with `msg_id` and
    /// `body`: `(KEY_HEADER, key)` and `(SIGNATURE_HEADER, signature)`.
    pub fn sign(&self, subject: &str, msg_id: &str, body: &[u8]) -> [(&'static str, String); 2] {
        let signature = self.0.sign(&signed_bytes(subject, msg_id, body));
        [
            (KEY_HEADER, self.public_key().to_text()),
            (
                SIGNATURE_HEADER,
                URL_SAFE_NO_PAD.encode(signature.to_bytes()),
            ),
        ]
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public {})", self.public_key())
    }
}

/// The public half of a signing key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Reads a key written by [`PublicKey::to_text`] (`dpk_…`).
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let bytes = decode_32(text, PUBLIC_PREFIX, "a dispatch public key")?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| KeyError("a dispatch public key is not a valid Ed25519 point".into()))
    }

    /// The key as text: what [`KEY_HEADER`] carries and workers are configured with.
    pub fn to_text(&self) -> String {
        format!(
            "{PUBLIC_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(self.0.as_bytes())
        )
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_text())
    }
}

/// Why a message is not a dispatch the gateway signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untrusted {
    /// It has no signature, key or message ID.
    Unsigned,
    /// It names a key this worker does not trust (never configured, or retired).
    UnknownKey(String),
    /// The signature does not match the subject, message ID and body: forged, or
    /// altered after signing.
    BadSignature,
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Untrusted::Unsigned => f.write_str("the message carries no dispatch signature"),
            Untrusted::UnknownKey(key) => {
                write!(
                    f,
                    "the message is signed with a key this worker does not trust ({key})"
                )
            }
            Untrusted::BadSignature => f.write_str(
                "the signature does not match the message (forged, or altered after signing)",
            ),
        }
    }
}

/// What a received message says about itself, as far as its signature is concerned.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signed<'a> {
    /// The subject it was delivered from.
    pub subject: &'a str,
    /// Its `Nats-Msg-Id` header.
    pub msg_id: Option<&'a str>,
    /// Its [`KEY_HEADER`].
    pub key: Option<&'a str>,
    /// Its [`SIGNATURE_HEADER`].
    pub signature: Option<&'a str>,
    /// Its body.
    pub body: &'a [u8],
}

/// The public keys a worker accepts dispatches from. Holding the old and the new key
/// during a rotation lets both kinds of message through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys(Vec<PublicKey>);

impl From<PublicKey> for TrustedKeys {
    fn from(key: PublicKey) -> Self {
        Self(vec![key])
    }
}

impl TrustedKeys {
    /// Trusts exactly `keys`.
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self(keys)
    }

    /// Reads a list of public keys separated by commas or white space (at least one).
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let keys = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|k| !k.is_empty())
            .map(PublicKey::from_text)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(KeyError("no dispatch public key given".into()));
        }
        Ok(Self(keys))
    }

    /// Whether no key is trusted (then every message is refused).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys, as text, comma-separated (what `WORKER_DISPATCH_PUBLIC_KEYS` takes).
    pub fn to_text(&self) -> String {
        let keys: Vec<String> = self.0.iter().map(PublicKey::to_text).collect();
        keys.join(",")
    }

    /// Checks that `message` was signed, unaltered, by one of the trusted keys.
    pub fn verify(&self, message: &Signed<'_>) -> Result<(), Untrusted> {
        let (Some(msg_id), Some(key), Some(signature)) =
            (message.msg_id, message.key, message.signature)
        else {
            return Err(Untrusted::Unsigned);
        };
        let trusted = self
            .0
            .iter()
            .find(|k| k.to_text() == key.trim())
            .ok_or_else(|| Untrusted::UnknownKey(key.chars().take(64).collect()))?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature.trim())
            .ok()
            .and_then(|bytes| Signature::from_slice(&bytes).ok())
            .ok_or(Untrusted::BadSignature)?;
        trusted
            .0
            .verify_strict(
                &signed_bytes(message.subject, msg_id, message.body),
                &signature,
            )
            .map_err(|_| Untrusted::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed([n; 32])
    }

    fn signed<'a>(headers: &'a [(&'static str, String); 2], body: &'a [u8]) -> Signed<'a> {
        Signed {
            subject: "ops.vm.zone-a",
            msg_id: Some("op-1.1"),
            key: Some(&headers[0].1),
            signature: Some(&headers[1].1),
            body,
        }
    }

    #[test]
    fn a_signed_message_verifies_and_any_change_to_it_does_not() {
        let k = key(7);
        let trusted = TrustedKeys::new(vec![k.public_key()]);
        let body = br#"{"spec":{"flavor":"m1.small"}}"#;
        let headers = k.sign("ops.vm.zone-a", "op-1.1", body);
        assert_eq!(headers[0].0, KEY_HEADER);
        assert_eq!(trusted.verify(&signed(&headers, body)), Ok(()));

        let altered = br#"{"spec":{"flavor":"m1.large"}}"#;
        let moved = Signed {
            subject: "ops.vm.zone-b",
            ..signed(&headers, body)
        };
        let renumbered = Signed {
            msg_id: Some("op-1.2"),
            ..signed(&headers, body)
        };
        for bad in [signed(&headers, altered), moved, renumbered] {
            assert_eq!(trusted.verify(&bad), Err(Untrusted::BadSignature));
        }
    }

    #[test]
    fn unsigned_and_unknown_keys_are_refused_and_rotation_trusts_both_keys() {
        let (old, new) = (key(1), key(2));
        let body = b"{}";
        let unsigned = Signed {
            subject: "ops.vm.zone-a",
            msg_id: Some("op.1"),
            body,
            ..Signed::default()
        };
        let trusted = TrustedKeys::new(vec![old.public_key()]);
        assert_eq!(trusted.verify(&unsigned), Err(Untrusted::Unsigned));
        let by_new = new.sign("ops.vm.zone-a", "op-1.1", body);
        assert!(matches!(
            trusted.verify(&signed(&by_new, body)),
            Err(Untrusted::UnknownKey(_))
        ));
        let both =
            TrustedKeys::from_text(&format!("{}, {}", old.public_key(), new.public_key())).unwrap();
        assert_eq!(both.verify(&signed(&by_new, body)), Ok(()));
        let by_old = old.sign("ops.vm.zone-a", "op-1.1", body);
        assert_eq!(both.verify(&signed(&by_old, body)), Ok(()));
    }

    #[test]
    fn a_signature_from_another_key_under_a_trusted_keys_name_is_refused() {
        let (trusted_key, forger) = (key(3), key(4));
        let body = b"{}";
        let mut headers = forger.sign("ops.vm.zone-a", "op-1.1", body);
        headers[0].1 = trusted_key.public_key().to_text();
        let trusted = TrustedKeys::new(vec![trusted_key.public_key()]);
        assert_eq!(
            trusted.verify(&signed(&headers, body)),
            Err(Untrusted::BadSignature)
        );
    }

    #[test]
    fn keys_round_trip_as_text_and_bad_text_is_refused() {
        let k = key(9);
        let text = k.to_text();
        assert!(text.starts_with("dsk_"));
        let back = SigningKey::from_text(&text).unwrap();
        assert_eq!(back.public_key(), k.public_key());
        let public = k.public_key().to_text();
        assert!(public.starts_with("dpk_"));
        assert_eq!(PublicKey::from_text(&public).unwrap(), k.public_key());
        assert!(
            !format!("{k:?}").contains(&text[4..]),
            "Debug hides the seed"
        );
        // A public key is not a signing key, and the reverse.
        assert!(SigningKey::from_text(&public).is_err());
        assert!(PublicKey::from_text(&text).is_err());
        assert!(PublicKey::from_text("dpk_short").is_err());
        assert!(TrustedKeys::from_text(" , ").is_err());
    }
}
