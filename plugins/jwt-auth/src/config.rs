//! The `[config]` table of the sidecar `jwt-auth.toml`, parsed and validated into
//! [`Settings`]: keys are decoded once, so a bad key is a configuration error (logged,
//! every token refused) rather than a per-connect surprise.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use p256::pkcs8::DecodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use serde::Deserialize;

/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
const MIN_HMAC_SECRET: usize = 32;
/// RFC 7518 §3.3: RSA keys of at least 2048 bits.
const MIN_RSA_BITS: usize = 2048;

/// The algorithms a key may be configured for (the token's `alg` must name the key's).
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Alg {
    /// HMAC with SHA-256, shared secret.
    #[serde(rename = "HS256")]
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    #[serde(rename = "ES256")]
    Es256,
}

impl Alg {
    /// The JOSE name (`alg` header value).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

/// Key material, one variant per algorithm: an HS256 secret can never reach an RSA or
/// ECDSA verifier, nor a public key an HMAC (no algorithm confusion).
pub(crate) enum KeyMaterial {
    Hmac(Vec<u8>),
    Rsa(rsa::pkcs1v15::VerifyingKey<sha2::Sha256>),
    Ecdsa(p256::ecdsa::VerifyingKey),
}

/// One verification key.
pub(crate) struct Key {
    /// A token naming a `kid` is checked against the keys with that kid and the keys
    /// without one; a token without a kid against every key of its algorithm.
    pub(crate) kid: Option<String>,
    pub(crate) material: KeyMaterial,
}

impl Key {
    pub(crate) fn alg(&self) -> Alg {
        match self.material {
            KeyMaterial::Hmac(_) => Alg::Hs256,
            KeyMaterial::Rsa(_) => Alg::Rs256,
            KeyMaterial::Ecdsa(_) => Alg::Es256,
        }
    }
}

/// What to answer for a CONNECT that carries no usable token.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Fallback {
    /// Ask the next plugin (and at the end the listener's own rule).
    #[default]
    Ignore,
    /// Refuse with 0x86.
    Deny,
}

/// Validated settings.
pub(crate) struct Settings {
    pub(crate) keys: Vec<Key>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub(crate) leeway: u64,
    /// Accepted `iss` values (empty: not checked).
    pub(crate) issuers: Vec<String>,
    /// Accepted `aud` values (empty: not checked); the token's `aud` must hold one.
    pub(crate) audiences: Vec<String>,
    /// Tokens without `exp` are refused.
    pub(crate) require_exp: bool,
    pub(crate) username_claim: String,
    pub(crate) username_must_match: bool,
    pub(crate) publish_claim: String,
    pub(crate) subscribe_claim: String,
    /// A CONNECT without a password.
    pub(crate) no_password: Fallback,
    /// A password that is not shaped like a JWT.
    pub(crate) not_a_jwt: Fallback,
}

/// A string or a list of strings (`issuer`, `audience`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    kid: Option<String>,
    alg: Alg,
    secret: Option<String>,
    secret_base64: Option<String>,
    public_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(default = "default_leeway")]
    leeway_s: u64,
    issuer: Option<OneOrMany>,
    audience: Option<OneOrMany>,
    #[serde(default = "yes")]
    require_exp: bool,
    #[serde(default = "default_username_claim")]
    username_claim: String,
    #[serde(default)]
    username_must_match: bool,
    #[serde(default = "default_publish_claim")]
    publish_claim: String,
    #[serde(default = "default_subscribe_claim")]
    subscribe_claim: String,
    #[serde(default)]
    no_password: Fallback,
    #[serde(default = "deny")]
    not_a_jwt: Fallback,
}

fn default_leeway() -> u64 {
    30
}
fn yes() -> bool {
    true
}
fn deny() -> Fallback {
    Fallback::Deny
}
fn default_username_claim() -> String {
    "sub".to_owned()
}
fn default_publish_claim() -> String {
    "publish".to_owned()
}
fn default_subscribe_claim() -> String {
    "subscribe".to_owned()
}

impl Settings {
    /// Parses and validates the `[config]` table (TOML text, as the `config` import
    /// renders it).
    pub(crate) fn from_toml(text: &str) -> Result<Settings, String> {
        Settings::from_raw(toml::from_str(text).map_err(|e| e.to_string())?)
    }

    fn from_raw(raw: Raw) -> Result<Settings, String> {
        if raw.keys.is_empty() {
            return Err("no [[config.keys]]: every token would be refused".to_owned());
        }
        let keys = raw
            .keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                let name = match &k.kid {
                    Some(kid) => format!("key {kid:?}"),
                    None => format!("key #{}", i + 1),
                };
                key(k).map_err(|e| format!("{name}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if raw.username_claim.is_empty() {
            return Err("username_claim is empty".to_owned());
        }
        Ok(Settings {
            keys,
            leeway: raw.leeway_s,
            issuers: raw.issuer.map(OneOrMany::into_vec).unwrap_or_default(),
            audiences: raw.audience.map(OneOrMany::into_vec).unwrap_or_default(),
            require_exp: raw.require_exp,
            username_claim: raw.username_claim,
            username_must_match: raw.username_must_match,
            publish_claim: raw.publish_claim,
            subscribe_claim: raw.subscribe_claim,
            no_password: raw.no_password,
            not_a_jwt: raw.not_a_jwt,
        })
    }
}

fn key(k: RawKey) -> Result<Key, String> {
    let material = match k.alg {
        Alg::Hs256 => {
            if k.public_key.is_some() {
                return Err("HS256 takes `secret` or `secret_base64`, not `public_key`".to_owned());
            }
            let secret = match (k.secret, k.secret_base64) {
                (Some(s), None) => s.into_bytes(),
                (None, Some(b)) => STANDARD
                    .decode(b.trim())
                    .map_err(|e| format!("secret_base64: {e}"))?,
                _ => return Err("HS256 needs exactly one of `secret`, `secret_base64`".to_owned()),
            };
            if secret.len() < MIN_HMAC_SECRET {
                return Err(format!(
                    "HS256 secret of {} bytes; at least {MIN_HMAC_SECRET} are required",
                    secret.len()
                ));
            }
            KeyMaterial::Hmac(secret)
        }
        Alg::Rs256 | Alg::Es256 => {
            if k.secret.is_some() || k.secret_base64.is_some() {
                return Err(format!(
                    "{} takes `public_key` (PEM), not a secret",
                    k.alg.name()
                ));
            }
            let Some(pem) = k.public_key else {
                return Err(format!("{} needs `public_key` (PEM SPKI)", k.alg.name()));
            };
            if k.alg == Alg::Rs256 {
                let key = rsa::RsaPublicKey::from_public_key_pem(pem.trim())
                    .map_err(|e| format!("public_key is not an RSA PEM public key: {e}"))?;
                let bits = key.size() * 8;
                if bits < MIN_RSA_BITS {
                    return Err(format!(
                        "RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"
                    ));
                }
                KeyMaterial::Rsa(rsa::pkcs1v15::VerifyingKey::new(key))
            } else {
                let key = p256::ecdsa::VerifyingKey::from_public_key_pem(pem.trim())
                    .map_err(|e| format!("public_key is not a P-256 PEM public key: {e}"))?;
                KeyMaterial::Ecdsa(key)
            }
        }
    };
    Ok(Key {
        kid: k.kid,
        material,
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]
pub(crate) mod tests {
    use super::*;

    /// A 32-byte HS256 secret for tests.
    pub(crate) const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

    /// Test P-256 key pair: the fixed private scalar and its public key as PEM.
    pub(crate) fn es256_key(seed: u8) -> (p256::ecdsa::SigningKey, String) {
        use p256::pkcs8::{EncodePublicKey as _, LineEnding};
        let mut bytes = [seed; 32];
        bytes[0] = 0x01; // below the curve order whatever the seed
        let signing = p256::ecdsa::SigningKey::from_bytes(&bytes.into()).unwrap();
        let pem = signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        (signing, pem)
    }

    #[test]
    fn minimal_config_has_the_documented_defaults() {
        let s = Settings::from_toml(&format!(
            "[[keys]]\nalg = \"HS256\"\nsecret = \"{SECRET}\"\n"
        ))
        .unwrap();
        assert_eq!(s.keys.len(), 1);
        assert_eq!(s.keys[0].alg(), Alg::Hs256);
        assert_eq!(s.leeway, 30);
        assert!(s.require_exp);
        assert_eq!(s.username_claim, "sub");
        assert!(!s.username_must_match);
        assert_eq!(
            (s.publish_claim.as_str(), s.subscribe_claim.as_str()),
            ("publish", "subscribe")
        );
        assert_eq!(s.no_password, Fallback::Ignore);
        assert_eq!(s.not_a_jwt, Fallback::Deny);
        assert!(s.issuers.is_empty() && s.audiences.is_empty());
    }

    #[test]
    fn the_example_sidecar_is_valid() {
        let sidecar: toml::Table =
            toml::from_str(include_str!("../jwt-auth.example.toml")).unwrap();
        let table = sidecar.get("config").cloned().unwrap();
        let s = Settings::from_raw(table.try_into().unwrap()).unwrap();
        assert_eq!(s.keys.len(), 1);
        assert_eq!(s.keys[0].alg(), Alg::Es256);
        assert_eq!(s.keys[0].kid.as_deref(), Some("example-ec"));
        assert_eq!((s.leeway, s.require_exp), (30, true));
        assert_eq!(s.no_password, Fallback::Ignore);
        assert_eq!(s.not_a_jwt, Fallback::Deny);
        // The commented HS256 example secret is long enough.
        let hs = "[[keys]]\nalg = \"HS256\"\nsecret_base64 = \"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==\"\n";
        assert!(Settings::from_toml(hs).is_ok());
    }

    #[test]
    fn full_config() {
        let (_, pem) = es256_key(7);
        let text = format!(
            "leeway_s = 5\nissuer = \"https://issuer\"\naudience = [\"mqtt\", \"other\"]\n\
             require_exp = false\nusername_claim = \"name\"\nusername_must_match = true\n\
             publish_claim = \"pub\"\nsubscribe_claim = \"sub\"\nno_password = \"deny\"\n\
             not_a_jwt = \"ignore\"\n\
             [[keys]]\nkid = \"h\"\nalg = \"HS256\"\nsecret_base64 = \"{}\"\n\
             [[keys]]\nkid = \"e\"\nalg = \"ES256\"\npublic_key = \"\"\"\n{pem}\"\"\"\n\
             [[keys]]\nkid = \"r\"\nalg = \"RS256\"\npublic_key = \"\"\"\n{}\"\"\"\n",
            STANDARD.encode([9u8; 32]),
            crate::token::tests::RSA_PUBLIC_PEM,
        );
        let s = Settings::from_toml(&text).unwrap();
        let algs: Vec<Alg> = s.keys.iter().map(Key::alg).collect();
        assert_eq!(algs, [Alg::Hs256, Alg::Es256, Alg::Rs256]);
        assert_eq!(s.issuers, ["https://issuer"]);
        assert_eq!(s.audiences, ["mqtt", "other"]);
        assert_eq!(s.leeway, 5);
        assert!(!s.require_exp && s.username_must_match);
        assert_eq!(s.no_password, Fallback::Deny);
        assert_eq!(s.not_a_jwt, Fallback::Ignore);
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let (_, pem) = es256_key(7);
        let cases = [
            ("", "no [[config.keys]]"),
            (
                "[[keys]]\nalg = \"none\"\nsecret = \"x\"\n",
                "unknown variant",
            ),
            (
                "[[keys]]\nalg = \"HS256\"\nsecret = \"short\"\n",
                "at least 32",
            ),
            ("[[keys]]\nalg = \"HS256\"\n", "exactly one of"),
            (
                "[[keys]]\nalg = \"HS256\"\nsecret_base64 = \"%%%\"\n",
                "secret_base64",
            ),
            ("[[keys]]\nalg = \"ES256\"\n", "needs `public_key`"),
            (
                "[[keys]]\nalg = \"ES256\"\npublic_key = \"garbage\"\n",
                "not a P-256",
            ),
            (
                "[[keys]]\nalg = \"ES256\"\nsecret = \"a-test-secret-of-at-least-32-bytes!\"\n",
                "not a secret",
            ),
            (
                "[[keys]]\nalg = \"HS256\"\nsecrets = \"x\"\n",
                "unknown field",
            ),
            ("unknown = 1\n", "unknown field"),
        ];
        for (text, why) in cases {
            match Settings::from_toml(text) {
                Ok(_) => panic!("accepted {text:?}"),
                Err(e) => assert!(e.contains(why), "{text:?}: {e}"),
            }
        }
        // A P-256 key where an RSA key is expected, and the other way round.
        let text = format!("[[keys]]\nalg = \"RS256\"\npublic_key = \"\"\"\n{pem}\"\"\"\n");
        let e = Settings::from_toml(&text).err().unwrap();
        assert!(e.contains("not an RSA"), "{e}");
        let text = format!(
            "[[keys]]\nalg = \"ES256\"\npublic_key = \"\"\"\n{}\"\"\"\n",
            crate::token::tests::RSA_PUBLIC_PEM
        );
        let e = Settings::from_toml(&text).err().unwrap();
        assert!(e.contains("not a P-256"), "{e}");
    }
}
