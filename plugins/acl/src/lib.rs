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
//! group = "workers"             # optional: a rule about joining shared subscription groups
//! ```
//!
//! Shared subscriptions (`$share/{group}/{filter}`): the filter is authorized like any
//! other, by the rules without `group`. Once any rule names a `group` (a name, `*`, or a
//! prefix with a trailing `*`), joining a group also needs an allow rule naming it whose
//! topic covers the filter, and a deny rule naming it refuses the join; a configuration
//! without group rules leaves groups open.
//!
//! Deny rules win over allow rules. A subscription is allowed when an allow rule's filter
//! covers every topic the requested filter can match, and denied when the requested
//! filter can match any topic of a deny rule. `%u` and `%c` are put in only when the
//! value is safe (not empty, no `/`, `+` or `#`): an allow rule with an unsafe value never
//! matches, and a deny rule then denies the whole level (so a client named `+` gets
//! nothing of `devices/%c/#`). The rules are checked by `init`: a file that does not
//! parse or a rule without exactly one of allow/deny or with an invalid filter refuses
//! the plugin version.

use std::sync::OnceLock;

use sandpiper_plugin::authorize::{Action, Authorize, Decision, Request};
use sandpiper_plugin::lifecycle::Init;
use sandpiper_plugin::share::{self, Share};
use sandpiper_plugin::topic;
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
    /// Shared subscription groups this rule is about (then it is only about joins).
    group: Option<String>,
}

fn config() -> &'static Result<Config, String> {
    static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let cfg: Config = sandpiper_plugin::config().map_err(|e| e.to_string())?;
        for (i, r) in cfg.rules.iter().enumerate() {
            let n = i + 1;
            if r.allow.is_some() == r.deny.is_some() {
                return Err(format!("rule {n}: exactly one of allow and deny"));
            }
            // Placeholders stand for whole values; the filter around them must be valid.
            let shape = r.topic.replace("%u", "u").replace("%c", "c");
            topic::check_filter(&shape)
                .map_err(|e| format!("rule {n}: topic {:?}: {e}", r.topic))?;
            if let Some(g) = &r.group {
                let name = g.strip_suffix('*').unwrap_or(g);
                if (name.is_empty() && g != "*") || name.contains(['/', '+', '#', '*']) {
                    return Err(format!(
                        "rule {n}: group {g:?}: a share name, \"*\" or a prefix ending in *"
                    ));
                }
                if r.allow.or(r.deny) == Some(Access::Write) {
                    return Err(format!("rule {n}: a group rule is about reading (joining)"));
                }
            }
        }
        Ok(cfg)
    })
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

fn applies(access: Access, action: Action) -> bool {
    match action {
        Action::Subscribe | Action::Retained => access != Access::Write,
        Action::Publish | Action::Will => access != Access::Read,
    }
}

fn decide(cfg: &Config, client: &Client, r: &Request) -> Decision {
    let user = client.username.as_deref();
    let id = client.client_id.as_str();
    let mut allowed = false;
    for rule in cfg.rules.iter().filter(|r| r.group.is_none()) {
        if !who_matches(&rule.username, user) || !who_matches(&rule.client_id, Some(id)) {
            continue;
        }
        let subscribe = matches!(r.action, Action::Subscribe);
        if let Some(a) = rule.deny
            && applies(a, r.action)
        {
            // A client id or user name that cannot stand in the filter widens the deny
            // rule's level to `+`: stricter, never weaker.
            let filter = topic::substitute_widened(&rule.topic, user, id);
            let hit = if subscribe {
                topic::overlaps(&filter, &r.topic)
            } else {
                topic::covers(&filter, &r.topic)
            };
            if hit {
                return Decision::Deny(0x87);
            }
        }
        // An allow rule whose placeholders have no safe value (no user name, or one
        // holding `/`, `+` or `#`) never matches.
        if let Some(a) = rule.allow
            && applies(a, r.action)
            && topic::substitute(&rule.topic, user, id).is_some_and(|f| topic::covers(&f, &r.topic))
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

/// Whether `client` may join `r.group` for `r.filter`: no opinion without group rules.
fn join(cfg: &Config, client: &Client, r: &share::Request) -> share::Decision {
    if cfg.rules.iter().all(|rule| rule.group.is_none()) {
        return share::Decision::Ignore;
    }
    let user = client.username.as_deref();
    let id = client.client_id.as_str();
    let mut allowed = false;
    for rule in cfg.rules.iter().filter(|r| r.group.is_some()) {
        if !who_matches(&rule.group, Some(&r.group))
            || !who_matches(&rule.username, user)
            || !who_matches(&rule.client_id, Some(id))
        {
            continue;
        }
        if rule.deny.is_some()
            && topic::overlaps(&topic::substitute_widened(&rule.topic, user, id), &r.filter)
        {
            return share::Decision::Deny(0x87);
        }
        if rule.allow.is_some()
            && topic::substitute(&rule.topic, user, id)
                .is_some_and(|f| topic::covers(&f, &r.filter))
        {
            allowed = true;
        }
    }
    if allowed {
        share::Decision::Allow
    } else {
        share::Decision::Deny(0x87)
    }
}

struct Acl;

impl Init for Acl {
    /// A rule file that does not parse, or a rule that is wrong, refuses this version: at
    /// start the plugin is not loaded, on a reload the previous rules keep serving.
    fn init() -> Result<(), String> {
        config().as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

impl Authorize for Acl {
    fn authorize(client: Client, requests: Vec<Request>) -> Vec<Decision> {
        match config() {
            Ok(cfg) => requests.iter().map(|r| decide(cfg, &client, r)).collect(),
            // Not reached once init has passed; fail closed regardless.
            Err(e) => {
                sandpiper_plugin::log::error(&format!("acl: {e}"));
                requests.iter().map(|_| Decision::Deny(0x87)).collect()
            }
        }
    }
}

impl Share for Acl {
    fn join(client: Client, requests: Vec<share::Request>) -> Vec<share::Decision> {
        match config() {
            Ok(cfg) => requests.iter().map(|r| join(cfg, &client, r)).collect(),
            Err(_) => requests
                .iter()
                .map(|_| share::Decision::Deny(0x87))
                .collect(),
        }
    }
}

sandpiper_plugin::export!(Acl with [init, authorize, share]);
