//! `password-auth`: checks CONNECT user names and passwords against password hashes, from
//! a password file (one `user:hash` line per user, what `sandpiper passwd FILE USER`
//! writes and what Mosquitto's `mosquitto_passwd` writes) and from the `[config.users]`
//! table of its sidecar `password-auth.toml`:
//!
//! ```toml
//! [config_files]
//! passwd = "password-auth.passwd"   # its text becomes [config] passwd
//! [config]
//! unknown_users = "deny"            # a user name nobody knows: "deny" (default) or "ignore"
//! [config.users]
//! alice = "$pbkdf2-sha256$i=8000,l=32$<salt>$<hash>"
//! ```
//!
//! Hashes: PHC strings `$pbkdf2-sha256$i=N,l=L$SALT$HASH` (what `sandpiper passwd`
//! writes), Mosquitto's `$7$N$SALT$HASH` (PBKDF2-SHA512) and `$6$SALT$HASH` (one round of
//! SHA-512, accepted for migration only), and this plugin's earlier
//! `pbkdf2-sha256$N$SALT$HASH`. `init` refuses a table or file with a line it cannot read
//! (naming it), so a broken file never replaces a working one.
//!
//! Comparison is constant-time, and a user name nobody knows costs the same time as a
//! known one with a wrong password (the first user's hash parameters are computed for
//! nothing), so timing does not tell which names exist. A client without a user name is
//! left to the next plugin (`ignore`), so anonymous access stays the listener's decision.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;

use sandpiper_plugin::authenticate::{Authenticate, ConnectInfo, Decision};
use sandpiper_plugin::lifecycle::Init;

/// MQTT 5 0x86: bad user name or password (3.x return code 4).
const BAD_CREDENTIALS: u8 = 0x86;
/// Most iterations a stored hash may ask for (a check must fit the plugin's time budget).
const MAX_ITERATIONS: u32 = 10_000_000;

/// A stored password hash.
#[derive(Debug, Clone, PartialEq)]
enum Hash {
    /// PBKDF2-HMAC-SHA256 (PHC `$pbkdf2-sha256$`, or this plugin's earlier format).
    Pbkdf2Sha256 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// PBKDF2-HMAC-SHA512 (Mosquitto's `$7$`).
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// SHA-512 of password and salt, once (Mosquitto's `$6$`).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

fn b64(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim_end_matches('=');
    STANDARD_NO_PAD
        .decode(s)
        .map_err(|_| "not base64".to_owned())
}

fn iterations(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_ITERATIONS).contains(&n) => Ok(n),
        _ => Err(format!(
            "iterations {s:?} not between 1 and {MAX_ITERATIONS}"
        )),
    }
}

fn digest(hash: Vec<u8>, max: usize) -> Result<Vec<u8>, String> {
    if hash.is_empty() || hash.len() > max {
        return Err(format!("hash of {} bytes", hash.len()));
    }
    Ok(hash)
}

impl Hash {
    /// Reads a stored hash in any of the accepted formats.
    fn parse(s: &str) -> Result<Hash, String> {
        let parts: Vec<&str> = s.split('$').collect();
        match parts.as_slice() {
            ["", "pbkdf2-sha256", params, salt, hash] => {
                let mut i = None;
                for p in params.split(',') {
                    match p.split_once('=') {
                        Some(("i", v)) => i = Some(iterations(v)?),
                        Some(("l", _)) => {}
                        _ => return Err(format!("unknown parameter {p:?}")),
                    }
                }
                Ok(Hash::Pbkdf2Sha256 {
                    iterations: i.ok_or("no i= parameter")?,
                    salt: b64(salt)?,
                    hash: digest(b64(hash)?, 64)?,
                })
            }
            ["pbkdf2-sha256", iter, salt, hash] => Ok(Hash::Pbkdf2Sha256 {
                iterations: iterations(iter)?,
                salt: b64(salt)?,
                hash: digest(b64(hash)?, 64)?,
            }),
            ["", "7", iter, salt, hash] => Ok(Hash::Pbkdf2Sha512 {
                iterations: iterations(iter)?,
                salt: b64(salt)?,
                hash: digest(b64(hash)?, 64)?,
            }),
            ["", "6", salt, hash] => Ok(Hash::Sha512 {
                salt: b64(salt)?,
                hash: digest(b64(hash)?, 64)?,
            }),
            _ => Err("not a known hash format ($pbkdf2-sha256$, $7$, $6$)".to_owned()),
        }
    }

    /// The hash of `password` with this hash's parameters.
    fn compute(&self, password: &[u8]) -> Vec<u8> {
        match self {
            Hash::Pbkdf2Sha256 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, *iterations, &mut out);
                out
            }
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, *iterations, &mut out);
                out
            }
            Hash::Sha512 { salt, .. } => {
                use sha2::Digest as _;
                let mut h = sha2::Sha512::new();
                h.update(password);
                h.update(salt);
                h.finalize().to_vec()
            }
        }
    }

    fn stored(&self) -> &[u8] {
        match self {
            Hash::Pbkdf2Sha256 { hash, .. }
            | Hash::Pbkdf2Sha512 { hash, .. }
            | Hash::Sha512 { hash, .. } => hash,
        }
    }

    /// Whether `password` matches, comparing every byte.
    fn verify(&self, password: &[u8]) -> bool {
        let out = self.compute(password);
        let stored = self.stored();
        out.len() == stored.len()
            && out
                .iter()
                .zip(stored)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    users: BTreeMap<String, String>,
    #[serde(default)]
    unknown_users: Option<String>,
    /// A password file's text (from the sidecar's `[config_files]`).
    #[serde(default)]
    passwd: Option<String>,
}

struct Users {
    users: BTreeMap<String, Hash>,
    ignore_unknown: bool,
    /// Checked for a user name nobody knows, so that it costs what a known one does.
    decoy: Option<Hash>,
}

/// Reads a password file: `user:hash` per line; blank lines and `#` comments skipped.
fn read_file(text: &str, users: &mut BTreeMap<String, Hash>) -> Result<(), String> {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("passwd line {}: not user:hash", n + 1))?;
        let hash = Hash::parse(hash).map_err(|e| format!("passwd line {} ({user}): {e}", n + 1))?;
        users.insert(user.to_owned(), hash);
    }
    Ok(())
}

fn load() -> Result<Users, String> {
    let c: Config = sandpiper_plugin::config().map_err(|e| e.to_string())?;
    let mut users = BTreeMap::new();
    if let Some(text) = &c.passwd {
        read_file(text, &mut users)?;
    }
    for (user, hash) in &c.users {
        users.insert(
            user.clone(),
            Hash::parse(hash).map_err(|e| format!("[config.users] {user}: {e}"))?,
        );
    }
    let ignore_unknown = match c.unknown_users.as_deref() {
        None | Some("deny") => false,
        Some("ignore") => true,
        Some(other) => return Err(format!("unknown_users = {other:?}: \"deny\" or \"ignore\"")),
    };
    let decoy = users.values().next().map(|h| match h {
        Hash::Pbkdf2Sha256 {
            iterations, hash, ..
        } => Hash::Pbkdf2Sha256 {
            iterations: *iterations,
            salt: vec![0x5a; 16],
            hash: vec![0; hash.len()],
        },
        Hash::Pbkdf2Sha512 {
            iterations, hash, ..
        } => Hash::Pbkdf2Sha512 {
            iterations: *iterations,
            salt: vec![0x5a; 16],
            hash: vec![0; hash.len()],
        },
        Hash::Sha512 { .. } => Hash::Sha512 {
            salt: vec![0x5a; 16],
            hash: vec![0; 64],
        },
    });
    Ok(Users {
        users,
        ignore_unknown,
        decoy,
    })
}

fn users() -> &'static Result<Users, String> {
    static USERS: OnceLock<Result<Users, String>> = OnceLock::new();
    USERS.get_or_init(load)
}

struct PasswordAuth;

impl Init for PasswordAuth {
    /// A users table or password file that does not read refuses this version: at start
    /// the plugin is not loaded, on a reload the previous users keep working.
    fn init() -> Result<(), String> {
        users().as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

impl Authenticate for PasswordAuth {
    fn authenticate(info: ConnectInfo) -> Decision {
        let Some(name) = info.username.as_deref() else {
            return Decision::Ignore;
        };
        let u = match users() {
            Ok(u) => u,
            // Not reached once init has passed; nobody gets in regardless.
            Err(_) => return Decision::Deny(BAD_CREDENTIALS),
        };
        let password = info.password.as_deref().unwrap_or_default();
        let Some(stored) = u.users.get(name) else {
            // As long as a check of a known user: timing does not tell who exists.
            if let Some(decoy) = &u.decoy {
                std::hint::black_box(decoy.verify(password));
            }
            return if u.ignore_unknown {
                Decision::Ignore
            } else {
                Decision::Deny(BAD_CREDENTIALS)
            };
        };
        if stored.verify(password) {
            Decision::allow()
        } else {
            Decision::Deny(BAD_CREDENTIALS)
        }
    }
}

sandpiper_plugin::export!(PasswordAuth with [init, authenticate]);

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    fn phc(password: &str, iterations: u32) -> String {
        let salt = b"0123456789abcdef";
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password.as_bytes(), salt, iterations, &mut out);
        format!(
            "$pbkdf2-sha256$i={iterations},l=32${}${}",
            STANDARD_NO_PAD.encode(salt),
            STANDARD_NO_PAD.encode(out)
        )
    }

    #[test]
    fn phc_pbkdf2_sha256() {
        let h = Hash::parse(&phc("s3cret", 1000)).unwrap();
        assert!(h.verify(b"s3cret"));
        assert!(!h.verify(b"s3cres"));
    }

    #[test]
    fn earlier_format() {
        let salt = b"salt";
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(b"pw", salt, 100, &mut out);
        let s = format!(
            "pbkdf2-sha256$100${}${}",
            STANDARD.encode(salt),
            STANDARD.encode(out)
        );
        assert!(Hash::parse(&s).unwrap().verify(b"pw"));
    }

    /// Mosquitto's `$7$` (PBKDF2-SHA512, 64-byte hash) and `$6$` (one SHA-512).
    #[test]
    fn mosquitto_formats() {
        let salt = [7u8; 12];
        let mut out = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<sha2::Sha512>(b"pw", &salt, 101, &mut out);
        let seven = format!("$7$101${}${}", STANDARD.encode(salt), STANDARD.encode(out));
        assert!(Hash::parse(&seven).unwrap().verify(b"pw"));
        assert!(!Hash::parse(&seven).unwrap().verify(b"px"));
        use sha2::Digest as _;
        let mut h = sha2::Sha512::new();
        h.update(b"pw");
        h.update(salt);
        let six = format!(
            "$6${}${}",
            STANDARD.encode(salt),
            STANDARD.encode(h.finalize())
        );
        assert!(Hash::parse(&six).unwrap().verify(b"pw"));
    }

    #[test]
    fn password_files() {
        let mut users = BTreeMap::new();
        let text = format!("# users\n\nalice:{}\nbob:{}\n", phc("a", 10), phc("b", 10));
        read_file(&text, &mut users).unwrap();
        assert!(users["alice"].verify(b"a"));
        assert!(users["bob"].verify(b"b"));
        for bad in ["carol", "carol:$9$x$y", "dave:$pbkdf2-sha256$i=0$AA$AA"] {
            assert!(read_file(bad, &mut users).is_err(), "{bad}");
        }
    }
}
