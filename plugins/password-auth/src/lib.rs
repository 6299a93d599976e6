//! `password-auth`: checks CONNECT user name and password against salted PBKDF2-SHA256
//! hashes in the `[config.users]` table of its sidecar `password-auth.toml`:
//!
//! ```toml
//! [config]
//! unknown_users = "deny"     # a user name not in the table: "deny" (default) or "ignore"
//! [config.users]
//! alice = "pbkdf2-sha256$100000$<salt, base64>$<hash, base64>"
//! ```
//!
//! `plugins/password-auth/add-user NAME` prints such a line (it asks for the password).
//! Comparison is constant-time; a client without a user name is left to the next plugin
//! (`ignore`), so anonymous access stays the listener's decision.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use sandpiper_plugin::authenticate::{Authenticate, ConnectInfo, Decision};

/// MQTT 5 0x86: bad user name or password (3.x return code 4).
const BAD_CREDENTIALS: u8 = 0x86;

struct Users {
    users: BTreeMap<String, String>,
    ignore_unknown: bool,
}

#[derive(serde::Deserialize)]
struct Config {
    #[serde(default)]
    users: BTreeMap<String, String>,
    #[serde(default)]
    unknown_users: Option<String>,
}

fn users() -> &'static Users {
    static USERS: OnceLock<Users> = OnceLock::new();
    USERS.get_or_init(|| {
        match sandpiper_plugin::config::<Config>() {
            Ok(c) => Users {
                users: c.users,
                ignore_unknown: c.unknown_users.as_deref() == Some("ignore"),
            },
            Err(e) => {
                // Nobody gets in with a broken user table (and the log says why).
                sandpiper_plugin::log::error(&format!("password-auth: {e}"));
                Users {
                    users: BTreeMap::new(),
                    ignore_unknown: false,
                }
            }
        }
    })
}

/// Verifies `password` against `pbkdf2-sha256$ITER$SALT$HASH`.
fn verify(stored: &str, password: &[u8]) -> bool {
    let mut parts = stored.split('$');
    let (Some("pbkdf2-sha256"), Some(iter), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Ok(iter), Ok(salt), Ok(hash)) = (
        iter.parse::<u32>(),
        STANDARD.decode(salt),
        STANDARD.decode(hash),
    ) else {
        return false;
    };
    if iter == 0 || hash.is_empty() || hash.len() > 64 {
        return false;
    }
    let mut out = vec![0u8; hash.len()];
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, &salt, iter, &mut out);
    // Constant time: every byte is compared.
    out.iter().zip(&hash).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

struct PasswordAuth;

impl Authenticate for PasswordAuth {
    fn authenticate(info: ConnectInfo) -> Decision {
        let Some(name) = info.username.as_deref() else {
            return Decision::Ignore;
        };
        let u = users();
        let Some(stored) = u.users.get(name) else {
            return if u.ignore_unknown {
                Decision::Ignore
            } else {
                Decision::Deny(BAD_CREDENTIALS)
            };
        };
        let password = info.password.as_deref().unwrap_or_default();
        if verify(stored, password) {
            Decision::allow()
        } else {
            Decision::Deny(BAD_CREDENTIALS)
        }
    }
}

sandpiper_plugin::export!(PasswordAuth with [authenticate]);
