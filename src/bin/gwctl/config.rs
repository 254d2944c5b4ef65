//! Where `gwctl` finds the gateway, its key and the tenant.
//!
//! In order: flags (`--url`, `--key`, `-t`); the environment (`GWCTL_URL`, `GWCTL_KEY`,
//! `GWCTL_TENANT`, read by clap; else `GW` and `KEY`, as the README's walkthrough sets
//! them); the config file `$GWCTL_CONFIG`, else `$XDG_CONFIG_HOME/gwctl/config`, else
//! `~/.config/gwctl/config`. The file holds `name = value` lines (`url`, `key`,
//! `tenant`); `#` starts a comment. A missing file is fine.

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
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let file = match path() {
            Some(p) if p.exists() => read(&p)?,
            _ => HashMap::new(),
        };
        let from_file = |name: &str| file.get(name).cloned();
        let key = key
            .or_else(|| env("KEY"))
            .or_else(|| from_file("key"))
            .ok_or("no API key: --key, GWCTL_KEY, or `key = …` in ~/.config/gwctl/config")?;
        Ok(Self {
            url: url
                .or_else(|| env("GW"))
                .or_else(|| from_file("url"))
                .unwrap_or_else(|| DEFAULT_URL.to_owned()),
            key,
            tenant: tenant.or_else(|| from_file("tenant")),
        })
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
    #[test]
    fn config_lines_parse() {
        let c = super::parse("# mine\nurl = http://gw:8080\n\nkey=\"gw_abc\"\n").unwrap();
        assert_eq!(c["url"], "http://gw:8080");
        assert_eq!(c["key"], "gw_abc");
        assert!(super::parse("url http://x").is_err());
    }
}
