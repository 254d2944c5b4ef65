//! Where `gwctl` finds the gateway, its key and the tenant.
//!
//! In order: flags (`--url`, `--key`, `-t`); the environment (`GWCTL_URL`, `GWCTL_KEY`,
//! `GWCTL_TENANT`, read by clap; else `GW` and `KEY`, as the README's walkthrough sets
//! them); the config file `$GWCTL_CONFIG`, else `$XDG_CONFIG_HOME/gwctl/config`, else
//! `~/.config/gwctl/config`. The file holds `name = value` lines (`url`, `key`,
//! `tenant`); `#` starts a comment. A missing file is fine. An empty value, anywhere,
//! counts as none: `GWCTL_URL=` leaves the URL to `GW` and the file.

use std::collections::HashMap;
use std::path::PathBuf;

/// The URL used when nothing names one (`gateway up`'s default).
const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// What a command talks to.
#[derive(Debug)]
pub struct Settings {
    /// The gateway's base URL.
    pub url: String,
    /// The API key.
    pub key: String,
    /// The tenant, if any.
    pub tenant: Option<String>,
}

impl Settings {
    /// Fills what the flags (and `GWCTL_*`) left open from `GW`/`KEY` and the file.
    pub fn resolve(
        url: Option<String>,
        key: Option<String>,
        tenant: Option<String>,
    ) -> Result<Self, String> {
        let file = match path() {
            Some(p) if p.exists() => read(&p)?,
            _ => HashMap::new(),
        };
        let flags = [url, key, tenant];
        Self::from_sources(flags, |name| std::env::var(name).ok(), &file)
    }

    /// [`Settings::resolve`] from `flags` (URL, key, tenant), the environment `env`
    /// and the config `file`; empty values count as none. The URL must be an absolute
    /// `http` or `https` URL.
    fn from_sources(
        flags: [Option<String>; 3],
        env: impl Fn(&str) -> Option<String>,
        file: &HashMap<String, String>,
    ) -> Result<Self, String> {
        let [url, key, tenant] = flags.map(given);
        let env = |name: &str| given(env(name));
        let from_file = |name: &str| given(file.get(name).cloned());
        let key = key
            .or_else(|| env("KEY"))
            .or_else(|| from_file("key"))
            .ok_or("no API key: --key, GWCTL_KEY, or `key = …` in ~/.config/gwctl/config")?;
        let url = url
            .or_else(|| env("GW"))
            .or_else(|| from_file("url"))
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        check_url(&url)?;
        Ok(Self {
            url,
            key,
            tenant: tenant.or_else(|| from_file("tenant")),
        })
    }
}

/// `value` unless it is empty.
fn given(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// Whether `url` can be the gateway's: an absolute `http` or `https` URL with a host,
/// no user name or password (the key is the credential; reqwest would send them as a
/// second `Authorization`), and no query or fragment (the API's paths are added to its
/// end).
fn check_url(url: &str) -> Result<(), String> {
    let usable = url::Url::parse(url).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.has_host()
            && u.username().is_empty()
            && u.password().is_none()
            && u.query().is_none()
            && u.fragment().is_none()
    });
    if usable {
        Ok(())
    } else {
        Err(format!(
            "not a gateway URL: {url:?} (an absolute http:// or https:// URL, such as {DEFAULT_URL})"
        ))
    }
}

fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GWCTL_CONFIG") {
        return Some(p.into());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("gwctl").join("config"))
}

fn read(path: &std::path::Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `name = value` lines; blank lines and `#` comments are skipped; values may be quoted.
pub fn parse(text: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected `name = value`", n + 1))?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        out.insert(name.trim().to_owned(), value.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Settings;
    use std::collections::HashMap;

    /// Settings from `flags`, the environment `env` and the file `file`.
    fn settings(
        flags: [Option<&str>; 3],
        env: &[(&str, &str)],
        file: &[(&str, &str)],
    ) -> Result<Settings, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let file = file
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let flags = flags.map(|f| f.map(str::to_owned));
        Settings::from_sources(flags, |name| env.get(name).cloned(), &file)
    }

    #[test]
    fn empty_values_count_as_none() {
        let env = [("GW", "http://gw:1"), ("KEY", "gw_env")];
        let file = [
            ("url", "http://file:2"),
            ("key", "gw_file"),
            ("tenant", "acme"),
        ];
        // What `GWCTL_URL= GWCTL_KEY= gwctl -t "" …` passes on.
        let s = settings([Some(""), Some(""), Some("")], &env, &file).unwrap();
        assert_eq!((s.url.as_str(), s.key.as_str()), ("http://gw:1", "gw_env"));
        assert_eq!(s.tenant.as_deref(), Some("acme"));
        let s = settings([None, None, None], &[("GW", ""), ("KEY", "")], &file).unwrap();
        assert_eq!(
            (s.url.as_str(), s.key.as_str()),
            ("http://file:2", "gw_file")
        );
        let s = settings([None, Some("k"), None], &[], &[("url", ""), ("tenant", "")]).unwrap();
        assert_eq!((s.url.as_str(), s.tenant), (super::DEFAULT_URL, None));
        assert!(
            settings([None, Some(""), None], &[], &[]).is_err(),
            "no key"
        );
        let s = settings([Some("http://flag:3"), Some("k"), Some("t")], &env, &file).unwrap();
        assert_eq!(
            (s.url.as_str(), s.tenant.as_deref()),
            ("http://flag:3", Some("t"))
        );
    }

    #[test]
    fn the_url_must_be_an_absolute_http_url() {
        for url in [
            "http://127.0.0.1:8080",
            "https://gw.example/",
            "http://gw/prefix",
        ] {
            assert!(
                settings([Some(url), Some("k"), None], &[], &[]).is_ok(),
                "{url}"
            );
        }
        for url in [
            "127.0.0.1:8080",
            "gw",
            "/v1",
            "ftp://gw",
            "http://",
            "http://gw/?a=1",
            "http://u:p@gw/",
            "http://u@gw/",
            " ",
        ] {
            let err = settings([Some(url), Some("k"), None], &[], &[]).unwrap_err();
            assert!(err.contains(&format!("{url:?}")), "{url}: {err}");
        }
    }

    #[test]
    fn config_lines_parse() {
        let c = super::parse("# mine\nurl = http://gw:8080\n\nkey=\"gw_abc\"\n").unwrap();
        assert_eq!(c["url"], "http://gw:8080");
        assert_eq!(c["key"], "gw_abc");
        assert!(super::parse("url http://x").is_err());
    }
}
