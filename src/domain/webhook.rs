//! Webhooks: which URLs may receive events, how deliveries are signed (the Standard
//! Webhooks specification, <https://www.standardwebhooks.com/>), and when a failed
//! delivery is tried again.

use super::ValidationError;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// Longest URL accepted.
pub const MAX_URL: usize = 2048;
/// Longest description accepted.
pub const MAX_DESCRIPTION: usize = 1024;
/// Prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// What the operator allows of webhook URLs beyond public `https` ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    /// Plain `http` URLs (`GATEWAY_WEBHOOK_ALLOW_HTTP`).
    pub allow_http: bool,
    /// Loopback, private, link-local and metadata addresses
    /// (`GATEWAY_WEBHOOK_ALLOW_PRIVATE`).
    pub allow_private: bool,
}

fn invalid(message: impl Into<String>) -> ValidationError {
    ValidationError::new("invalid_webhook_url", "url", message)
}

/// Checks a webhook URL's form: `https` (or `http` when allowed), a host, no user
/// information, no fragment. Where its host resolves to is checked separately
/// ([`forbidden_address`]), at registration and again at each delivery.
pub fn check_url(text: &str, policy: UrlPolicy) -> Result<url::Url, ValidationError> {
    if text.len() > MAX_URL {
        return Err(invalid(format!("longer than {MAX_URL} characters")));
    }
    let url = url::Url::parse(text).map_err(|e| invalid(format!("not a URL: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" if policy.allow_http => {}
        "http" => return Err(invalid("must be https")),
        other => return Err(invalid(format!("scheme {other:?} is not https"))),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("has no host"));
    }
    if url.port() == Some(0) {
        return Err(invalid("port 0 is not a port anything listens on"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not carry a user name or password"));
    }
    if url.fragment().is_some() {
        return Err(invalid("must not have a fragment"));
    }
    Ok(url)
}

/// Why a delivery may not go to `ip`, if it may not: loopback, private, link-local
/// (cloud metadata services live there), shared (CGNAT), reserved, documentation,
/// benchmarking, unspecified, multicast or broadcast addresses. IPv6 is allowed only
/// in global unicast space (`2000::/3`) outside its special ranges; the forms that carry
/// an IPv4 address (mapped `::ffff:0:0/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are
/// judged by that address, so `[64:ff9b::a9fe:a9fe]` is the metadata service it names.
pub fn forbidden_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => forbidden_v4(v4),
            None => forbidden_v6(v6),
        },
    }
}

/// The IPv4 address an IPv6 address stands for, in the forms that carry one to a real
/// host: mapped (`::ffff:a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`), 6to4 (`2002:AABB:CCDD::`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if let Some(mapped) = ip.to_ipv4_mapped() {
        Some(mapped)
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(v4(s[6], s[7]))
    } else if s[0] == 0x2002 {
        Some(v4(s[1], s[2]))
    } else {
        None
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local (metadata)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT)")
    } else if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || a == 0 {
        Some("non-unicast")
    } else if a >= 240 {
        Some("reserved")
    } else if (a, b, c) == (192, 0, 0) {
        Some("protocol-assignment (192.0.0.0/24)")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking (198.18.0.0/15)")
    } else if (a, b, c) == (192, 88, 99) {
        Some("6to4 relay (192.88.99.0/24)")
    } else if ip.is_documentation() {
        Some("documentation")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || ip.is_multicast() {
        Some("non-unicast")
    } else if s[0] & 0xfe00 == 0xfc00 {
        Some("private (unique local, metadata)")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if s[0] & 0xe000 != 0x2000 {
        // `::a.b.c.d` (IPv4-compatible), site-local `fec0::/10`, NAT64's local-use
        // prefix and every other range outside global unicast.
        Some("non-global (outside 2000::/3)")
    } else if s[0] == 0x2001 && s[1] < 0x0200 {
        Some("protocol-assignment (2001::/23: Teredo, benchmarking, ORCHID)")
    } else if (s[0] == 0x2001 && s[1] == 0x0db8) || s[0] & 0xfff0 == 0x3ff0 {
        Some("documentation")
    } else {
        None
    }
}

/// A new signing secret from 32 random bytes.
pub fn secret_from(bytes: [u8; 32]) -> String {
    format!("{SECRET_PREFIX}{}", B64.encode(bytes))
}

/// The `v1,<signature>` of a delivery: base64 of HMAC-SHA256, keyed by the secret's
/// decoded bytes, over `{msg_id}.{timestamp}.{body}`.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = B64
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
    mac.update(body);
    Some(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

/// Parses a retry schedule: comma-separated delays (`500ms`, `5s`, `5m`, `2h`), the
/// wait before the 2nd, 3rd, … attempt.
pub fn parse_schedule(text: &str) -> Result<Vec<Duration>, String> {
    text.split(',')
        .map(|one| {
            let one = one.trim();
            let split = one
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(|| format!("{one:?} has no unit (ms, s, m, h)"))?;
            let (n, unit) = one.split_at(split);
            let n: u64 = n.parse().map_err(|_| format!("{one:?} is not a delay"))?;
            let per = match unit {
                "ms" => return Ok(Duration::from_millis(n)),
                "s" => 1,
                "m" => 60,
                "h" => 3600,
                _ => return Err(format!("{one:?}: unit must be ms, s, m or h")),
            };
            n.checked_mul(per)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("{one:?} is too long"))
        })
        .collect()
}

/// The wait before the next attempt after `attempts` failed ones, with `jitter` (a factor
/// between 0.8 and 1.2, so retries of many deliveries spread out); `None` when the
/// schedule is spent and the delivery has failed.
pub fn next_delay(schedule: &[Duration], attempts: u32, jitter: f64) -> Option<Duration> {
    let base = schedule.get((attempts as usize).checked_sub(1)?)?;
    Some(base.mul_f64(jitter.clamp(0.8, 1.2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_webhooks_test_vector_signs_as_published() {
        // From the specification's reference libraries.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert_eq!(sign("whsec_not base64!", "m", 1, b""), None);
    }

    #[test]
    fn urls_must_be_https_with_a_host_and_nothing_secret() {
        let strict = UrlPolicy::default();
        assert!(check_url("https://hooks.example.com/in?x=1", strict).is_ok());
        for bad in [
            "http://hooks.example.com/",
            "ftp://hooks.example.com/",
            "https://user:pw@hooks.example.com/",
            "https://hooks.example.com/#frag",
            "https://hooks.example.com:0/",
            "not a url",
            "https://",
        ] {
            let e = check_url(bad, strict).unwrap_err();
            assert_eq!(e.code, "invalid_webhook_url", "{bad}");
        }
        let lax = UrlPolicy {
            allow_http: true,
            allow_private: true,
        };
        assert!(check_url("http://127.0.0.1:9000/", lax).is_ok());
        assert!(check_url(&format!("https://x.io/{}", "a".repeat(MAX_URL)), lax).is_err());
    }

    #[test]
    fn private_loopback_link_local_and_metadata_addresses_are_forbidden() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:10.0.0.1",
            "224.0.0.1",
            // Found by an outside probe: IPv6 forms of loopback and metadata addresses,
            // and IPv4 ranges that are no public host.
            "::127.0.0.1",
            "::a9fe:a9fe",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "fec0::1",
            "2001::1",
            "2001:db8::1",
            "198.18.0.1",
            "240.0.0.1",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
        ] {
            assert!(forbidden_address(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "2606:2800:220:1::1",
            "100.128.0.1",
            "172.32.0.1",
            // A public IPv4 host through NAT64 or 6to4 (DNS64 answers like these on
            // IPv6-only networks).
            "64:ff9b::5db8:d822",
            "2002:5db8:d822::1",
            "2a00:1450:4001:81c::200e",
        ] {
            assert_eq!(forbidden_address(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn the_schedule_parses_and_ends() {
        let s = parse_schedule("5s, 5m,30m,2h,100ms").unwrap();
        assert_eq!(s[0], Duration::from_secs(5));
        assert_eq!(s[3], Duration::from_secs(7200));
        assert_eq!(s[4], Duration::from_millis(100));
        assert!(parse_schedule("5").is_err());
        assert!(parse_schedule("5d").is_err());
        assert!(parse_schedule("18446744073709551615h").is_err(), "no wrap");
        assert_eq!(next_delay(&s, 1, 1.0), Some(Duration::from_secs(5)));
        assert_eq!(
            next_delay(&s, 1, 5.0),
            Some(Duration::from_secs(6)),
            "clamped"
        );
        assert_eq!(next_delay(&s, 6, 1.0), None, "spent");
        assert_eq!(next_delay(&s, 0, 1.0), None);
        assert!(secret_from([7; 32]).starts_with(SECRET_PREFIX));
    }
}
