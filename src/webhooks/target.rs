//! Where a webhook may point, and the HTTP client that sends deliveries: no redirects,
//! a total timeout, TLS verified, a bounded read of the answer, and a resolver that
//! refuses forbidden addresses at connection time too (so a name that resolved to a
//! public address at registration cannot be pointed at the metadata service later).

use crate::domain::webhook::{forbidden_address, UrlPolicy};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most of an answer's body kept in the delivery log.
pub const SNIPPET: usize = 1024;

/// Why a URL may not receive webhooks.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Its host resolves to a forbidden address.
    #[error("{host} resolves to {ip}, a {why} address; webhooks go to public addresses only")]
    Forbidden {
        /// The host.
        host: String,
        /// The address.
        ip: IpAddr,
        /// What kind of address.
        why: &'static str,
    },
    /// Its host does not resolve.
    #[error("{0} does not resolve")]
    Unresolvable(String),
}

/// The addresses `host` resolves to (an IP literal is itself).
async fn resolve(host: &str) -> Vec<IpAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return vec![ip];
    }
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((bare, 0))).await {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
        _ => Vec::new(),
    }
}

/// Checks where `url` points: every address its host resolves to must be allowed.
pub async fn check(url: &url::Url, policy: UrlPolicy) -> Result<(), TargetError> {
    let host = url.host_str().unwrap_or_default().to_owned();
    let ips = resolve(&host).await;
    if ips.is_empty() {
        return Err(TargetError::Unresolvable(host));
    }
    if policy.allow_private {
        return Ok(());
    }
    for ip in ips {
        if let Some(why) = forbidden_address(ip) {
            return Err(TargetError::Forbidden { host, ip, why });
        }
    }
    Ok(())
}

/// A resolver that drops forbidden addresses (unless allowed).
struct Guarded {
    allow_private: bool,
}

impl reqwest::dns::Resolve for Guarded {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips = resolve(&host).await;
            let ok: Vec<SocketAddr> = ips
                .into_iter()
                .filter(|ip| allow || forbidden_address(*ip).is_none())
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            if ok.is_empty() {
                return Err(format!("{host}: no allowed address to connect to").into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(ok.into_iter());
            Ok(addrs)
        })
    }
}

/// The client deliveries are sent with.
pub fn client(policy: UrlPolicy, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .no_proxy()
        .dns_resolver(Arc::new(Guarded {
            allow_private: policy.allow_private,
        }))
        .user_agent(concat!("gateway-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the webhook client builds")
}

/// What came of sending one delivery.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The answer's status, if one came.
    pub status: Option<u16>,
    /// The start of the answer's body (or the error).
    pub response: String,
    /// Why there was no answer.
    pub error: Option<String>,
    /// How long it took.
    pub latency: Duration,
}

impl Sent {
    /// Whether the endpoint took it (a `2xx`; redirects are not followed, so a `3xx`
    /// is a failure).
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// Posts `body` to `url` with `headers`, reading at most [`SNIPPET`] bytes of the answer.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    policy: UrlPolicy,
) -> Sent {
    let started = Instant::now();
    let failed = |error: String| Sent {
        status: None,
        response: String::new(),
        error: Some(error),
        latency: started.elapsed(),
    };
    // An IP literal never reaches the resolver: check it here.
    if let Ok(u) = url::Url::parse(url) {
        if let Err(e) = check_literal(&u, policy) {
            return failed(e);
        }
    }
    let mut req = client.post(url).body(body);
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let mut res = match req.send().await {
        Ok(r) => r,
        Err(e) => return failed(describe(&e)),
    };
    let status = res.status().as_u16();
    let mut snippet = Vec::new();
    while snippet.len() < SNIPPET {
        match res.chunk().await {
            Ok(Some(chunk)) => snippet.extend_from_slice(&chunk),
            _ => break,
        }
    }
    snippet.truncate(SNIPPET);
    Sent {
        status: Some(status),
        response: String::from_utf8_lossy(&snippet).replace('\0', ""),
        error: None,
        latency: started.elapsed(),
    }
}

fn check_literal(url: &url::Url, policy: UrlPolicy) -> Result<(), String> {
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        _ => return Ok(()),
    };
    match forbidden_address(ip) {
        Some(why) if !policy.allow_private => Err(format!("{ip} is a {why} address")),
        _ => Ok(()),
    }
}

/// A send error with its causes (reqwest's own message hides them).
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
