//! `sandpiper passwd FILE USER`: adds, changes or removes a user in a password file of the
//! `password-auth` plugin. One `user:hash` line per user, Mosquitto's layout, so a
//! `mosquitto_passwd` file can be used as it is (its `$7$` lines are read by the plugin)
//! and extended with this command. Hashes are PHC strings
//! `$pbkdf2-sha256$i=N,l=32$SALT$HASH` (base64 without padding) with a 16-byte random
//! salt.

use std::io::{BufRead, IsTerminal, Write};
use std::num::NonZeroU32;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;

/// Iterations when none are asked for: a check in the plugin (WebAssembly) then costs
/// about 9 ms on the 2-core development machine (README, password-auth).
pub const DEFAULT_ITERATIONS: u32 = 25_000;

/// The PHC string of `password` with `salt`.
pub fn hash(password: &[u8], salt: &[u8], iterations: NonZeroU32) -> String {
    let mut out = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        password,
        &mut out,
    );
    format!(
        "$pbkdf2-sha256$i={iterations},l=32${}${}",
        STANDARD_NO_PAD.encode(salt),
        STANDARD_NO_PAD.encode(out)
    )
}

/// A parsed `$pbkdf2-sha256$i=N,l=32$SALT$HASH` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phc {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl Phc {
    /// Parses the PHC string [`hash`] writes; `None` for anything else.
    pub fn parse(s: &str) -> Option<Phc> {
        let rest = s.strip_prefix("$pbkdf2-sha256$")?;
        let mut parts = rest.split('$');
        let params = parts.next()?;
        let salt = STANDARD_NO_PAD.decode(parts.next()?).ok()?;
        let hash = STANDARD_NO_PAD.decode(parts.next()?).ok()?;
        if parts.next().is_some() || hash.is_empty() || hash.len() > 64 {
            return None;
        }
        let mut iterations = None;
        for p in params.split(',') {
            match p.split_once('=')? {
                ("i", n) => iterations = NonZeroU32::new(n.parse().ok()?),
                ("l", n) if n.parse::<usize>().ok()? == hash.len() => {}
                _ => return None,
            }
        }
        Some(Phc {
            iterations: iterations?,
            salt,
            hash,
        })
    }

    /// Whether `secret` hashes to this (compared in constant time).
    pub fn verify(&self, secret: &[u8]) -> bool {
        ring::pbkdf2::verify(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            secret,
            &self.hash,
        )
        .is_ok()
    }
}

/// Iterations of an admin API token's hash: a token is 32 random bytes, which no number of
/// iterations makes easier or harder to guess; a few keep a check cheap.
pub const TOKEN_ITERATIONS: u32 = 1_000;

/// A new admin API token (`sp_` and 32 random bytes in base64url) and its PHC string.
pub fn new_token() -> Result<(String, String), ring::error::Unspecified> {
    use ring::rand::SecureRandom as _;
    let rng = ring::rand::SystemRandom::new();
    let mut secret = [0u8; 32];
    let mut salt = [0u8; 16];
    rng.fill(&mut secret)?;
    rng.fill(&mut salt)?;
    let token = format!(
        "sp_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let iterations = NonZeroU32::new(TOKEN_ITERATIONS).ok_or(ring::error::Unspecified)?;
    let phc = hash(token.as_bytes(), &salt, iterations);
    Ok((token, phc))
}

/// `text` (a password file) with `user`'s line replaced by `line`, or added, or removed
/// (`None`); every other line kept as it was. Whether the user was there.
pub fn edit(text: &str, user: &str, line: Option<&str>) -> (String, bool) {
    let mut out = String::with_capacity(text.len() + 128);
    let mut found = false;
    for l in text.lines() {
        if l.split_once(':').is_some_and(|(u, _)| u == user) {
            found = true;
            if let Some(new) = line {
                out.push_str(new);
                out.push('\n');
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    if !found && let Some(new) = line {
        out.push_str(new);
        out.push('\n');
    }
    (out, found)
}

/// Reads the password: from the terminal, twice and not echoed; else one line of standard
/// input.
fn read_password() -> Result<String, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("reading the password: {e}"))?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_owned());
    }
    let ask = |prompt: &str| -> Result<String, String> {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        let fd = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&fd).map_err(|e| e.to_string())?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        let _ = rustix::termios::tcsetattr(&fd, rustix::termios::OptionalActions::Now, &quiet);
        let mut line = String::new();
        let r = fd.lock().read_line(&mut line);
        let _ = rustix::termios::tcsetattr(&fd, rustix::termios::OptionalActions::Now, &saved);
        eprintln!();
        r.map_err(|e| format!("reading the password: {e}"))?;
        Ok(line.trim_end_matches(['\n', '\r']).to_owned())
    };
    let first = ask("password: ")?;
    if ask("again: ")? != first {
        return Err("the two passwords differ".to_owned());
    }
    Ok(first)
}

/// The `passwd` command; says what it did.
pub fn run(file: &Path, user: &str, iterations: u32, delete: bool) -> Result<String, String> {
    if user.is_empty() || user.contains([':', '\n', '\r']) {
        return Err("a user name is not empty and holds no ':' or line break".to_owned());
    }
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e.to_string()),
    };
    let line = if delete {
        None
    } else {
        let iterations =
            NonZeroU32::new(iterations).ok_or("iterations must be at least 1".to_owned())?;
        let password = read_password()?;
        if password.is_empty() {
            return Err("empty password".to_owned());
        }
        let mut salt = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| "no random bytes for the salt".to_owned())?;
        Some(format!(
            "{user}:{}",
            hash(password.as_bytes(), &salt, iterations)
        ))
    };
    let (text, found) = edit(&text, user, line.as_deref());
    if delete && !found {
        return Err(format!("no user {user}"));
    }
    // Written beside and renamed: the plugin (which reloads on a change) never reads half
    // a file. A new file is readable by its owner only.
    let tmp = file.with_extension("passwd-tmp");
    {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut f = o
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, file).map_err(|e| e.to_string())?;
    Ok(match (delete, found) {
        (true, _) => format!("user {user} removed"),
        (false, true) => format!("password of {user} changed"),
        (false, false) => format!("user {user} added"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_other_lines() {
        let text = "# users\nalice:$7$101$a$b\nbob:x\n";
        let (t, found) = edit(text, "bob", Some("bob:y"));
        assert!(found);
        assert_eq!(t, "# users\nalice:$7$101$a$b\nbob:y\n");
        let (t, found) = edit(&t, "carol", Some("carol:z"));
        assert!(!found);
        assert!(t.ends_with("carol:z\n"));
        let (t, found) = edit(&t, "alice", None);
        assert!(found);
        assert_eq!(t, "# users\nbob:y\ncarol:z\n");
    }

    #[test]
    fn phc_strings() {
        let h = hash(b"pw", b"0123456789abcdef", NonZeroU32::new(1000).unwrap());
        assert!(h.starts_with("$pbkdf2-sha256$i=1000,l=32$MDEyMzQ1Njc4OWFiY2RlZg$"));
        assert_eq!(h.split('$').count(), 5);
    }

    #[test]
    fn tokens_verify_against_their_hash_only() {
        let (token, phc) = new_token().unwrap();
        assert!(token.starts_with("sp_") && token.len() == 46, "{token}");
        let parsed = Phc::parse(&phc).unwrap();
        assert!(parsed.verify(token.as_bytes()));
        assert!(!parsed.verify(b"sp_other"));
        let (other, _) = new_token().unwrap();
        assert_ne!(token, other);
        for bad in [
            "",
            "$pbkdf2-sha256$i=0,l=32$AA$AA",
            "$pbkdf2-sha256$i=10,l=31$MDEy$MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY",
            "$pbkdf2-sha512$i=10,l=32$AA$AA",
            "$pbkdf2-sha256$i=10$AA$!!",
            "$pbkdf2-sha256$i=10$AA$AA$AA",
            "$7$101$a$b",
        ] {
            assert!(Phc::parse(bad).is_none(), "{bad}");
        }
    }
}
