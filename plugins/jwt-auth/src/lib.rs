//! `jwt-auth`: clients authenticate with a JWT as their CONNECT password, and the
//! token's topic claims decide what they may publish and subscribe to.
//!
//! - `authenticate`: the password is a compact JWS signed with HS256 (shared secret),
//!   RS256 or ES256 (PEM public keys), checked against the keys of the sidecar's
//!   `[config]` (see `jwt-auth.example.toml`): signature, `exp`/`nbf` with a leeway,
//!   `iss`/`aud` when configured. A valid token lets the client in under the user name of
//!   its `sub` claim (configurable) and attaches its topic claims as attributes
//!   (`jwt.publish` and `jwt.subscribe`, one filter per attribute, plus the marker
//!   `jwt.authenticated`). A bad token is refused with 0x86 (3.x: return code 4); a
//!   client without a password is left to the next plugin (`ignore`).
//! - `authorize`: for clients carrying the marker, publish and will topics must match a
//!   `jwt.publish` filter, subscriptions must be covered by a `jwt.subscribe` filter and
//!   retained delivery matched by one; `%u`/`%c` stand for the user name and client id.
//!   Anything else is refused with 0x87. Other clients: `ignore`.
//!
//! The token is checked once, at CONNECT: a connection outlives its token's `exp` (the
//! broker caches authorize decisions per connection, so rights must not depend on time).
//!
//! Boundary: `config` parses the sidecar, `token` verifies tokens and `topics` matches
//! filters, all without host calls (unit-tested on the host); this file is the glue to
//! the hooks (through `sandpiper-plugin`).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod config;
mod token;
mod topics;

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use sandpiper_plugin::Init;
use sandpiper_plugin::authenticate::{self as authn, Authenticate, ConnectInfo, Grant};
use sandpiper_plugin::authorize::{self as authz, Action, Authorize, Request};
use sandpiper_plugin::log::{Level, log};
use sandpiper_plugin::reason::{BAD_USER_NAME_OR_PASSWORD, NOT_AUTHORIZED};
use sandpiper_plugin::types::{Attribute, Client};

use config::{Fallback, Settings};

/// Set on every client this plugin let in: its authorize hook decides for those only.
const ATTR_MARK: &str = "jwt.authenticated";
/// One attribute per topic filter of the token's publish claim.
const ATTR_PUBLISH: &str = "jwt.publish";
/// One attribute per topic filter of the token's subscribe claim.
const ATTR_SUBSCRIBE: &str = "jwt.subscribe";

/// The settings, parsed once per instance (a changed sidecar reloads the plugin).
fn settings() -> &'static Result<Settings, String> {
    static SETTINGS: OnceLock<Result<Settings, String>> = OnceLock::new();
    SETTINGS.get_or_init(|| Settings::from_toml(&sandpiper_plugin::config::toml()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn fallback(f: Fallback) -> authn::Decision {
    match f {
        Fallback::Ignore => authn::Decision::Ignore,
        Fallback::Deny => authn::Decision::Deny(BAD_USER_NAME_OR_PASSWORD),
    }
}

fn attribute(name: &str, value: &str) -> Attribute {
    Attribute {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}

struct JwtAuth;

/// A configuration that does not parse refuses the plugin at load: on a live reload the
/// previous version keeps serving.
impl Init for JwtAuth {
    fn init() -> Result<(), String> {
        settings().as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

impl Authenticate for JwtAuth {
    fn authenticate(info: ConnectInfo) -> authn::Decision {
        let settings = match settings() {
            Ok(s) => s,
            // Nobody gets in with a broken configuration (and the log says why).
            Err(e) => {
                log(
                    Level::Error,
                    &format!("invalid [config]: {e}"),
                    &[("client_id", &info.client_id)],
                );
                return authn::Decision::Deny(NOT_AUTHORIZED);
            }
        };
        let Some(password) = info.password.as_deref().filter(|p| !p.is_empty()) else {
            return fallback(settings.no_password);
        };
        if !token::looks_like_jwt(password) && settings.not_a_jwt == Fallback::Ignore {
            return authn::Decision::Ignore;
        }
        match token::verify(password, settings, info.username.as_deref(), now()) {
            Ok(id) => {
                let mut attributes = vec![attribute(ATTR_MARK, "true")];
                attributes.extend(id.publish.iter().map(|f| attribute(ATTR_PUBLISH, f)));
                attributes.extend(id.subscribe.iter().map(|f| attribute(ATTR_SUBSCRIBE, f)));
                authn::Decision::Allow(Grant {
                    username: Some(id.username),
                    attributes,
                    auth_data: None,
                })
            }
            Err(refusal) => {
                log(
                    Level::Info,
                    "token refused",
                    &[
                        ("client_id", &info.client_id),
                        ("reason", &refusal.to_string()),
                    ],
                );
                authn::Decision::Deny(BAD_USER_NAME_OR_PASSWORD)
            }
        }
    }
}

impl Authorize for JwtAuth {
    fn authorize(client: Client, requests: Vec<Request>) -> Vec<authz::Decision> {
        if !client.attributes.iter().any(|a| a.name == ATTR_MARK) {
            return requests.iter().map(|_| authz::Decision::Ignore).collect();
        }
        let filters = |name: &'static str| {
            client
                .attributes
                .iter()
                .filter(move |a| a.name == name)
                .map(|a| a.value.as_str())
        };
        let user = client.username.as_deref();
        requests
            .iter()
            .map(|r| {
                let claim = match r.action {
                    Action::Publish | Action::Will => ATTR_PUBLISH,
                    Action::Subscribe | Action::Retained => ATTR_SUBSCRIBE,
                };
                if topics::any_covers(filters(claim), &r.topic, user, &client.client_id) {
                    authz::Decision::Allow
                } else {
                    authz::Decision::Deny(NOT_AUTHORIZED)
                }
            })
            .collect()
    }
}

// Only these two hooks: `auth_step` keeps the SDK's default (this plugin never starts
// an enhanced authentication exchange).
sandpiper_plugin::export!(JwtAuth with [init, authenticate, authorize]);

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, user: Option<&str>, attrs: &[(&str, &str)]) -> Client {
        Client {
            client_id: id.to_owned(),
            username: user.map(str::to_owned),
            listener: "default".to_owned(),
            attributes: attrs.iter().map(|(n, v)| attribute(n, v)).collect(),
        }
    }

    fn ask(c: &Client, requests: &[(Action, &str)]) -> Vec<authz::Decision> {
        let requests = requests
            .iter()
            .map(|&(action, topic)| Request {
                action,
                topic: topic.to_owned(),
                qos: sandpiper_plugin::types::Qos::AtLeastOnce,
                retain: false,
            })
            .collect();
        JwtAuth::authorize(c.clone(), requests)
    }

    #[test]
    fn clients_of_other_plugins_are_ignored() {
        let c = client("x", Some("u"), &[(ATTR_PUBLISH, "#"), ("role", "admin")]);
        let d = ask(&c, &[(Action::Publish, "a"), (Action::Subscribe, "#")]);
        assert!(matches!(
            d[..],
            [authz::Decision::Ignore, authz::Decision::Ignore]
        ));
    }

    #[test]
    fn token_clients_get_their_claims_and_nothing_else() {
        let c = client(
            "dev1",
            Some("alice"),
            &[
                (ATTR_MARK, "true"),
                (ATTR_PUBLISH, "devices/%c/#"),
                (ATTR_PUBLISH, "users/%u/out"),
                (ATTR_SUBSCRIBE, "alerts/#"),
                (ATTR_SUBSCRIBE, "users/%u/+"),
            ],
        );
        let cases = [
            (Action::Publish, "devices/dev1/t", true),
            (Action::Will, "devices/dev1/status", true),
            (Action::Publish, "users/alice/out", true),
            (Action::Publish, "devices/dev2/t", false),
            (Action::Publish, "alerts/x", false),
            (Action::Subscribe, "alerts/+/high", true),
            (Action::Subscribe, "alerts/#", true),
            (Action::Subscribe, "users/alice/+", true),
            (Action::Subscribe, "users/alice/#", false),
            (Action::Subscribe, "#", false),
            (Action::Subscribe, "devices/dev1/t", false),
            (Action::Retained, "alerts/fire", true),
            (Action::Retained, "devices/dev1/t", false),
        ];
        let requests: Vec<(Action, &str)> = cases.iter().map(|&(a, t, _)| (a, t)).collect();
        let decisions = ask(&c, &requests);
        assert_eq!(decisions.len(), cases.len());
        for ((action, topic, allowed), d) in cases.iter().zip(&decisions) {
            let got = match d {
                authz::Decision::Allow => true,
                authz::Decision::Deny(NOT_AUTHORIZED) => false,
                _ => panic!("{action:?} {topic}: unexpected decision"),
            };
            assert_eq!(got, *allowed, "{action:?} {topic}");
        }
    }

    #[test]
    fn a_token_without_topic_claims_may_do_nothing() {
        let c = client("c", Some("u"), &[(ATTR_MARK, "true")]);
        let d = ask(&c, &[(Action::Publish, "a"), (Action::Subscribe, "a")]);
        assert!(matches!(
            d[..],
            [
                authz::Decision::Deny(NOT_AUTHORIZED),
                authz::Decision::Deny(NOT_AUTHORIZED)
            ]
        ));
    }
}
