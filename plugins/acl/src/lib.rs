//! `acl`: allow/deny rules for publish and subscribe, from the `[config]` table of the
//! plugin's sidecar `acl.toml`:
//!
//! ```toml
//! [config]
//! default = "deny"              # when no rule matches: "deny" (default), "allow" or "ignore"
//! [[config.rules]]
//! allow = "readwrite"           # or deny = ...; "read" (subscribe), "write" (publish), "readwrite"
//! topic = "devices/%c/#"        # %u = user name, %c = client id; MQTT wildcards
//! username = "alice"            # optional: only for this user ("*" or absent: anyone)
//! client_id = "sensor-*"        # optional: only for these client ids (a trailing * is a prefix)
//! ```
//!
//! Deny rules win over allow rules. A subscription is allowed when an allow rule's filter
//! covers every topic the requested filter can match, and denied when the requested
//! filter can match any topic of a deny rule.

use std::sync::OnceLock;

use sandpiper_plugin::authorize::{Action, Authorize, Decision, Request};
use sandpiper_plugin::types::Client;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    default: Default_,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Default_ {
    #[default]
    Deny,
    Allow,
    Ignore,
}

#[derive(serde::Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Access {
    Read,
    Write,
    Readwrite,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    allow: Option<Access>,
    deny: Option<Access>,
    topic: String,
    username: Option<String>,
    client_id: Option<String>,
}

fn config() -> &'static Result<Config, String> {
    static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();
    CONFIG.get_or_init(|| sandpiper_plugin::config().map_err(|e| e.to_string()))
}

fn who_matches(pattern: &Option<String>, value: Option<&str>) -> bool {
    match pattern.as_deref() {
        None | Some("*") => true,
        Some(p) => match (p.strip_suffix('*'), value) {
            (Some(prefix), Some(v)) => v.starts_with(prefix),
            (None, Some(v)) => v == p,
            (_, None) => false,
        },
    }
}

/// `rule` covers every topic `req` (a name or a filter) can match.
fn covers(rule: &str, req: &str) -> bool {
    if req.starts_with('$') != rule.starts_with('$') && (rule.starts_with(['+', '#'])) {
        return false;
    }
    let (mut r, mut q) = (rule.split('/'), req.split('/'));
    loop {
        match (r.next(), q.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Some topic matches both `a` and `b`.
fn overlaps(a: &str, b: &str) -> bool {
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn applies(access: Access, action: Action) -> bool {
    match action {
        Action::Subscribe | Action::Retained => access != Access::Write,
        Action::Publish | Action::Will => access != Access::Read,
    }
}

fn decide(cfg: &Config, client: &Client, r: &Request) -> Decision {
    let user = client.username.as_deref();
    let mut allowed = false;
    for rule in &cfg.rules {
        if !who_matches(&rule.username, user)
            || !who_matches(&rule.client_id, Some(&client.client_id))
        {
            continue;
        }
        // %u with no user name never matches (a rule for "the user's own topics").
        if rule.topic.contains("%u") && user.is_none() {
            continue;
        }
        let topic = rule
            .topic
            .replace("%u", user.unwrap_or_default())
            .replace("%c", &client.client_id);
        let subscribe = matches!(r.action, Action::Subscribe);
        if let Some(a) = rule.deny {
            let hit = if subscribe {
                overlaps(&topic, &r.topic)
            } else {
                covers(&topic, &r.topic)
            };
            if applies(a, r.action) && hit {
                return Decision::Deny(0x87);
            }
        }
        if let Some(a) = rule.allow
            && applies(a, r.action)
            && covers(&topic, &r.topic)
        {
            allowed = true;
        }
    }
    match (allowed, cfg.default) {
        (true, _) | (false, Default_::Allow) => Decision::Allow,
        (false, Default_::Deny) => Decision::Deny(0x87),
        (false, Default_::Ignore) => Decision::Ignore,
    }
}

struct Acl;

impl Authorize for Acl {
    fn authorize(client: Client, requests: Vec<Request>) -> Vec<Decision> {
        match config() {
            Ok(cfg) => requests.iter().map(|r| decide(cfg, &client, r)).collect(),
            // A broken rule file denies everything (and says why).
            Err(e) => {
                sandpiper_plugin::log::error(&format!("acl: {e}"));
                requests.iter().map(|_| Decision::Deny(0x87)).collect()
            }
        }
    }
}

sandpiper_plugin::export!(Acl with [authorize]);
