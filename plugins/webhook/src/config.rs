//! The sidecar's `[config]`: where to POST, extra headers, and how long each network
//! wait may take. Checked once per instance; a bad table makes every batch answer
//! `retry` with the reason, so nothing is lost while the operator fixes it.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Longest `timeout_ms` accepted (the broker's longest call budget).
pub const MAX_TIMEOUT_MS: u32 = 60_000;

/// `[config]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `http://host[:port]/path?query` or `https://...`.
    pub url: String,
    /// Extra request headers (`Authorization = "Bearer ..."`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Each wait of a request: connecting, the first byte of the answer, between bytes.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
}

fn default_timeout_ms() -> u32 {
    5000
}

/// The URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http`.
    Http,
    /// `https`.
    Https,
}

/// Where a batch goes: the URL split as `wasi:http` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Scheme.
    pub scheme: Scheme,
    /// `host[:port]`, as written.
    pub authority: String,
    /// Path and query, at least `/`.
    pub path_with_query: String,
}

/// Headers the plugin sets itself or that the transport owns.
const RESERVED: [&str; 7] = [
    "content-type",
    "content-length",
    "host",
    "connection",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
];

impl Config {
    /// The target and headers, or why the table cannot be used.
    pub fn check(&self) -> Result<(Target, Vec<(String, String)>), String> {
        let target = parse_url(&self.url)?;
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!("timeout_ms must be between 1 and {MAX_TIMEOUT_MS}"));
        }
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            if lower.is_empty() || !lower.bytes().all(is_token_byte) {
                return Err(format!(
                    "header name {name:?} is not a valid HTTP field name"
                ));
            }
            if RESERVED.contains(&lower.as_str()) {
                return Err(format!(
                    "header {name:?} is set by the plugin or the transport"
                ));
            }
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(format!("header {name:?} has a line break in its value"));
            }
            headers.push((lower, value.clone()));
        }
        Ok((target, headers))
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Splits an absolute `http`/`https` URL without user info or fragment.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let bad = |why: &str| Err(format!("url {url:?}: {why}"));
    let (scheme, rest) = match url.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("http") => (Scheme::Http, rest),
        Some((s, rest)) if s.eq_ignore_ascii_case("https") => (Scheme::Https, rest),
        _ => return bad("must start with http:// or https://"),
    };
    if url.contains('#') {
        return bad("a fragment is never sent");
    }
    if url.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return bad("spaces and control characters must be percent-encoded");
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        return bad("user info is not supported (use an Authorization header)");
    }
    let (host, port) = match authority.strip_prefix('[') {
        // IPv6 literal: `[addr]` or `[addr]:port`.
        Some(v6) => match v6.split_once(']') {
            Some((addr, "")) => (addr, None),
            Some((addr, after)) => match after.strip_prefix(':') {
                Some(port) => (addr, Some(port)),
                None => return bad("junk after the IPv6 address"),
            },
            None => return bad("unclosed ["),
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return bad("no host");
    }
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return bad("the port is not a number from 0 to 65535");
    }
    let path_with_query = match path {
        "" => "/".to_owned(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_owned(),
    };
    Ok(Target {
        scheme,
        authority: authority.to_owned(),
        path_with_query,
    })
}
