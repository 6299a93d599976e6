//! Compact JWS (RFC 7515) tokens with JWT claims (RFC 7519): splitting, verifying the
//! signature against the configured keys, checking the registered claims, and reading
//! the user name and topic claims.
//!
//! Everything here takes attacker-controlled bytes: it returns a [`Refusal`] for any
//! input and never panics. The clock is a parameter, so tests pin it.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::Mac as _;
use serde_json::{Map, Value};

use crate::config::{Alg, Key, KeyMaterial, Settings};
use crate::topics;

/// Why a token was not accepted. The text is for the broker's log: it never contains
/// the token or its signature.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The password is not shaped like a JWS at all (three base64url parts whose first
    /// is a JSON header with an `alg`): maybe a plain password for another plugin.
    NotAJwt,
    /// It is a JWS, but a part does not decode or a field has the wrong type.
    Malformed(&'static str),
    /// The header names an extension this verifier does not implement (`crit`).
    Critical,
    /// `alg` is `none`, unknown, or not configured for any key.
    Algorithm(String),
    /// No configured key of the token's algorithm (and `kid`, if it names one).
    NoKey,
    /// No candidate key verifies the signature.
    Signature,
    /// `exp` has passed (beyond the leeway), or is missing while required.
    Expired,
    MissingExp,
    /// `nbf` is still ahead (beyond the leeway).
    NotYetValid,
    /// `iss` is missing or not one of the configured issuers.
    Issuer,
    /// `aud` is missing or names none of the configured audiences.
    Audience,
    /// The user name claim is missing, not a string, or empty.
    NoUsername,
    /// The CONNECT's user name differs from the token's (`username_must_match`).
    UsernameMismatch,
    /// A topic claim is not a string or a list of valid topic filters.
    TopicClaim(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotAJwt => write!(f, "the password is not a JWT"),
            Refusal::Malformed(what) => write!(f, "malformed token: {what}"),
            Refusal::Critical => write!(f, "header has `crit` extensions"),
            Refusal::Algorithm(alg) => write!(f, "algorithm {alg:?} is not accepted"),
            Refusal::NoKey => write!(f, "no configured key for the token's alg/kid"),
            Refusal::Signature => write!(f, "bad signature"),
            Refusal::Expired => write!(f, "token expired"),
            Refusal::MissingExp => write!(f, "token has no `exp`"),
            Refusal::NotYetValid => write!(f, "token not valid yet (`nbf`)"),
            Refusal::Issuer => write!(f, "issuer not accepted"),
            Refusal::Audience => write!(f, "audience not accepted"),
            Refusal::NoUsername => write!(f, "no user name claim"),
            Refusal::UsernameMismatch => write!(f, "user name differs from the token's"),
            Refusal::TopicClaim(why) => write!(f, "topic claim: {why}"),
        }
    }
}

/// What a verified token grants.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The user name claim.
    pub(crate) username: String,
    /// Topic filters the client may publish to (and store a will on).
    pub(crate) publish: Vec<String>,
    /// Topic filters the client may subscribe to (and receive retained messages of).
    pub(crate) subscribe: Vec<String>,
}

/// A JWS split into its parts, header decoded.
struct Jws<'a> {
    header: Map<String, Value>,
    /// `BASE64URL(header) '.' BASE64URL(payload)`: the bytes the signature covers.
    signing_input: &'a str,
    payload: &'a str,
    signature: &'a str,
}

/// Splits a compact JWS. `Err(NotAJwt)` unless it has exactly three parts and a header
/// that is a JSON object with a string `alg`.
fn split(token: &[u8]) -> Result<Jws<'_>, Refusal> {
    let token = std::str::from_utf8(token).map_err(|_| Refusal::NotAJwt)?;
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::NotAJwt);
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Refusal::NotAJwt)?;
    let Ok(Value::Object(header_json)) = serde_json::from_slice::<Value>(&header_bytes) else {
        return Err(Refusal::NotAJwt);
    };
    if !header_json.get("alg").is_some_and(Value::is_string) {
        return Err(Refusal::NotAJwt);
    }
    // header.len() + 1 + payload.len() is within the token, which holds both dots.
    let signing_input = token
        .get(..header.len() + 1 + payload.len())
        .ok_or(Refusal::NotAJwt)?;
    Ok(Jws {
        header: header_json,
        signing_input,
        payload,
        signature,
    })
}

/// The password has the shape of a JWS (see [`Refusal::NotAJwt`]).
pub(crate) fn looks_like_jwt(password: &[u8]) -> bool {
    split(password).is_ok()
}

fn verify_with(key: &Key, signing_input: &[u8], signature: &[u8]) -> bool {
    match &key.material {
        KeyMaterial::Hmac(secret) => {
            let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) else {
                return false;
            };
            mac.update(signing_input);
            // Constant-time comparison.
            mac.verify_slice(signature).is_ok()
        }
        KeyMaterial::Rsa(vk) => {
            use rsa::signature::Verifier as _;
            rsa::pkcs1v15::Signature::try_from(signature)
                .is_ok_and(|sig| vk.verify(signing_input, &sig).is_ok())
        }
        KeyMaterial::Ecdsa(vk) => {
            use p256::ecdsa::signature::Verifier as _;
            // JWS ES256 signatures are R || S, 32 bytes each (RFC 7518 §3.4), not DER.
            p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| vk.verify(signing_input, &sig).is_ok())
        }
    }
}

/// A NumericDate claim as whole seconds (`round_up` for `nbf`, so a fraction never
/// makes a token valid earlier). `Err` when present but not a number.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &str,
    round_up: bool,
) -> Result<Option<i64>, Refusal> {
    let Some(v) = claims.get(name) else {
        return Ok(None);
    };
    let malformed = Refusal::Malformed("a time claim is not a number");
    if let Some(i) = v.as_i64() {
        return Ok(Some(i));
    }
    if v.is_u64() {
        return Ok(Some(i64::MAX));
    }
    let f = v.as_f64().filter(|f| f.is_finite()).ok_or(malformed)?;
    let f = if round_up { f.ceil() } else { f.floor() };
    // Float-to-int `as` saturates: absurd dates clamp to the ends of time.
    Ok(Some(f as i64))
}

/// One string or a list of strings (`aud`, topic claims); `None` for any other shape.
fn strings(v: &Value) -> Option<Vec<&str>> {
    match v {
        Value::String(s) => Some(vec![s.as_str()]),
        Value::Array(items) => items.iter().map(Value::as_str).collect(),
        _ => None,
    }
}

/// The topic filters of claim `name` (none when absent).
fn topic_claim(claims: &Map<String, Value>, name: &str) -> Result<Vec<String>, Refusal> {
    let Some(v) = claims.get(name) else {
        return Ok(Vec::new());
    };
    let filters = strings(v).ok_or_else(|| {
        Refusal::TopicClaim(format!("`{name}` is not a string or a list of strings"))
    })?;
    filters
        .into_iter()
        .map(|f| {
            if topics::is_valid_filter(f) {
                Ok(f.to_owned())
            } else {
                Err(Refusal::TopicClaim(format!(
                    "`{name}` holds an invalid topic filter"
                )))
            }
        })
        .collect()
}

/// Verifies `token` (the CONNECT password) at Unix time `now` and returns what it grants
/// to a client that gave the user name `connect_username`.
pub(crate) fn verify(
    token: &[u8],
    settings: &Settings,
    connect_username: Option<&str>,
    now: u64,
) -> Result<Identity, Refusal> {
    let jws = split(token)?;
    if jws.header.contains_key("crit") {
        return Err(Refusal::Critical);
    }
    let alg_name = jws
        .header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let alg = [Alg::Hs256, Alg::Rs256, Alg::Es256]
        .into_iter()
        .find(|a| a.name() == alg_name)
        .ok_or_else(|| Refusal::Algorithm(alg_name.chars().take(16).collect()))?;
    let kid = match jws.header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.as_str()),
        Some(_) => return Err(Refusal::Malformed("`kid` is not a string")),
    };
    // The key decides the algorithm: an HS256 token only ever meets HMAC secrets.
    let mut candidates = settings
        .keys
        .iter()
        .filter(|k| k.alg() == alg)
        .filter(|k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
        .peekable();
    if candidates.peek().is_none() {
        return Err(if settings.keys.iter().any(|k| k.alg() == alg) {
            Refusal::NoKey
        } else {
            Refusal::Algorithm(alg_name.to_owned())
        });
    }
    let signature = URL_SAFE_NO_PAD
        .decode(jws.signature)
        .map_err(|_| Refusal::Malformed("signature is not base64url"))?;
    if !candidates.any(|k| verify_with(k, jws.signing_input.as_bytes(), &signature)) {
        return Err(Refusal::Signature);
    }

    // Signed by a trusted key from here on; the claims are still checked for shape.
    let payload = URL_SAFE_NO_PAD
        .decode(jws.payload)
        .map_err(|_| Refusal::Malformed("payload is not base64url"))?;
    let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(&payload) else {
        return Err(Refusal::Malformed("payload is not a JSON object"));
    };
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let leeway = i64::try_from(settings.leeway).unwrap_or(i64::MAX);
    match numeric_date(&claims, "exp", false)? {
        // RFC 7519 §4.1.4: valid only before `exp`.
        Some(exp) if now >= exp.saturating_add(leeway) => return Err(Refusal::Expired),
        None if settings.require_exp => return Err(Refusal::MissingExp),
        _ => {}
    }
    if let Some(nbf) = numeric_date(&claims, "nbf", true)?
        && now.saturating_add(leeway) < nbf
    {
        return Err(Refusal::NotYetValid);
    }
    if !settings.issuers.is_empty() {
        let iss = claims.get("iss").and_then(Value::as_str);
        if !iss.is_some_and(|i| settings.issuers.iter().any(|want| want == i)) {
            return Err(Refusal::Issuer);
        }
    }
    if !settings.audiences.is_empty() {
        let aud = claims.get("aud").and_then(strings).unwrap_or_default();
        if !aud
            .iter()
            .any(|a| settings.audiences.iter().any(|want| want == a))
        {
            return Err(Refusal::Audience);
        }
    }

    let username = claims
        .get(&settings.username_claim)
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty() && !u.contains('\0'))
        .ok_or(Refusal::NoUsername)?;
    // An empty CONNECT user name counts as none (MQTT 5 clients that must send one).
    let given = connect_username.filter(|u| !u.is_empty());
    if settings.username_must_match && given.is_some_and(|u| u != username) {
        return Err(Refusal::UsernameMismatch);
    }
    Ok(Identity {
        username: username.to_owned(),
        publish: topic_claim(&claims, &settings.publish_claim)?,
        subscribe: topic_claim(&claims, &settings.subscribe_claim)?,
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
    use crate::config::tests::{SECRET, es256_key};
    use p256::ecdsa::signature::Signer as _;

    /// 2048-bit RSA public key (test only) and an RS256 token signed by its private key
    /// (generated once with openssl; the private key was not kept). Header
    /// `{"alg":"RS256","typ":"JWT","kid":"rsa-1"}`, claims
    /// `{"sub":"rsa-user","iss":"https://issuer.example","aud":"mqtt","exp":2000000000,
    /// "nbf":1700000000,"publish":["rsa/%u/#"],"subscribe":["rsa/#"]}`.
    pub(crate) const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAr4ebySDca7OAZcl1amel
A9/ZSWNGwO/Fmb7xWKZ7l83p71t/h5J0OzTaDdxrcEe1hHFkD6YWT4+RpQRXJob/
q5gqvSNFFScWhCP1yBTEc3H/WJee12Nj+MqZNiInkabnMc+VLbbRW6Nx+S2518jc
kHNJGzhARxlpXmHyYnhuccVY437L3hQPMwClAI7eR5M9Ruv+MqB/GVC11SB47fyu
aoK5dWNgawr3Wwx0skeH9/tfaEuHcQvl+LImCrfGgcOrMyZGEM8an38TJAFVvoco
MR58vvwOIj9i6z5fbhyG8E2jRaDm5PeVR7Ws5iCpIstS8hEUQEZpbKi3oIiQfwq2
dwIDAQAB
-----END PUBLIC KEY-----
";
    const RSA_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6InJzYS0xIn0.\
eyJzdWIiOiJyc2EtdXNlciIsImlzcyI6Imh0dHBzOi8vaXNzdWVyLmV4YW1wbGUiLCJhdWQiOiJtcXR0IiwiZXhwIjoyMDAwMDAwMDAwLCJuYmYiOjE3MDAwMDAwMDAsInB1Ymxpc2giOlsicnNhLyV1LyMiXSwic3Vic2NyaWJlIjpbInJzYS8jIl19.\
dqFdrMwbRXCAFdmgtwRYO_u5nJ8uVtsMflOzMvDFLx14ANscdvWRzW-5nuVQp3XUzvEU5xsEgRN1n3QxB-1_6tULE5vGEX4wt2-jw4EM7UPLS3Ya9SJ6ipmRM6qTLIk-T6DuVUz5fLe0nY__-uF1O8N_zrntWtlJEk8utN5zBn8sIvnthba3gnBbvy7ZscEP2i3PMbgIUEP3aZUMt3NbbGYH-3Jl7sHNwYhxJenuTTyoBmCl8F-ULjgWtosrBjZi3tY7W-0tv4fBCqkIrQgX9Irtle-sOet-UXP_o5rIaDsx8T19pkjC4UWNt7Rj25Ga6qQuYubm7wqJ5rNcLvdpFw";
    /// A 1024-bit RSA public key: too short for RS256.
    const RSA_1024_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDGTEuLc3bsHsvn/MSDVGkRvm94
PYaCu/dbsth0fxqiVGI8cjTc5oG+Hke4aC3Q7p6u2kXihFEbD50dlFDflpR8CsZ6
1Bdezz3QsnI6CvmskGvXI7UtCAsOzseGdO9IQ5//bVh9UftIefUC12eapAtv6JKj
Uv7G9wb9mx/eFXFVfQIDAQAB
-----END PUBLIC KEY-----
";

    /// 2023-11-14, between the RSA token's `nbf` and `exp`.
    const NOW: u64 = 1_700_000_000;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `header.claims.` (signature to be appended).
    fn unsigned(header: &str, claims: &str) -> String {
        format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()))
    }

    fn hs256_with(secret: &[u8], header: &str, claims: &str) -> String {
        let input = unsigned(header, claims);
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(&mac.finalize().into_bytes()))
    }

    fn hs256(claims: &str) -> String {
        hs256_with(SECRET.as_bytes(), r#"{"alg":"HS256","typ":"JWT"}"#, claims)
    }

    fn es256_with(key: &p256::ecdsa::SigningKey, header: &str, claims: &str) -> String {
        let input = unsigned(header, claims);
        let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig.to_bytes()))
    }

    fn settings(extra: &str) -> Settings {
        let (_, es_pem) = es256_key(1);
        let text = format!(
            "{extra}\n\
             [[keys]]\nalg = \"HS256\"\nsecret = \"{SECRET}\"\n\
             [[keys]]\nalg = \"ES256\"\nkid = \"ec-1\"\npublic_key = \"\"\"\n{es_pem}\"\"\"\n\
             [[keys]]\nalg = \"RS256\"\nkid = \"rsa-1\"\npublic_key = \"\"\"\n{RSA_PUBLIC_PEM}\"\"\"\n"
        );
        Settings::from_toml(&text).unwrap()
    }

    fn only(key_toml: &str) -> Settings {
        Settings::from_toml(key_toml).unwrap()
    }

    const GOOD: &str =
        r#"{"sub":"alice","exp":1700000100,"publish":["devices/%c/#"],"subscribe":"alerts/+"}"#;

    #[test]
    fn hs256_token_grants_its_claims() {
        let id = verify(hs256(GOOD).as_bytes(), &settings(""), None, NOW).unwrap();
        assert_eq!(
            id,
            Identity {
                username: "alice".into(),
                publish: vec!["devices/%c/#".into()],
                subscribe: vec!["alerts/+".into()],
            }
        );
    }

    #[test]
    fn es256_token_verifies_with_the_kid_or_without_it() {
        let (key, _) = es256_key(1);
        let s = settings("");
        let with_kid = es256_with(&key, r#"{"alg":"ES256","kid":"ec-1"}"#, GOOD);
        assert_eq!(
            verify(with_kid.as_bytes(), &s, None, NOW).unwrap().username,
            "alice"
        );
        let without = es256_with(&key, r#"{"alg":"ES256"}"#, GOOD);
        assert!(verify(without.as_bytes(), &s, None, NOW).is_ok());
        // A kid naming no key: the ES256 key has a kid of its own, so it is not tried.
        let other_kid = es256_with(&key, r#"{"alg":"ES256","kid":"ec-2"}"#, GOOD);
        assert_eq!(
            verify(other_kid.as_bytes(), &s, None, NOW),
            Err(Refusal::NoKey)
        );
        // Another P-256 key's signature.
        let (stranger, _) = es256_key(2);
        let forged = es256_with(&stranger, r#"{"alg":"ES256","kid":"ec-1"}"#, GOOD);
        assert_eq!(
            verify(forged.as_bytes(), &s, None, NOW),
            Err(Refusal::Signature)
        );
    }

    #[test]
    fn es256_signature_in_der_form_is_refused() {
        let (key, _) = es256_key(1);
        let input = unsigned(r#"{"alg":"ES256"}"#, GOOD);
        let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
        let der = format!("{input}.{}", b64(sig.to_der().as_bytes()));
        assert_eq!(
            verify(der.as_bytes(), &settings(""), None, NOW),
            Err(Refusal::Signature)
        );
    }

    #[test]
    fn rs256_fixed_vector() {
        let s = settings("issuer = \"https://issuer.example\"\naudience = \"mqtt\"");
        let id = verify(RSA_TOKEN.as_bytes(), &s, Some("rsa-user"), NOW).unwrap();
        assert_eq!(id.username, "rsa-user");
        assert_eq!(id.publish, ["rsa/%u/#"]);
        assert_eq!(id.subscribe, ["rsa/#"]);
        // One changed claim byte breaks the signature.
        let mut tampered = RSA_TOKEN.to_owned().into_bytes();
        let at = RSA_TOKEN.find('.').unwrap() + 5;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        assert_eq!(verify(&tampered, &s, None, NOW), Err(Refusal::Signature));
        // A truncated signature (255 bytes: whole base64 groups).
        let short = &RSA_TOKEN[..RSA_TOKEN.len() - 2];
        assert_eq!(
            verify(short.as_bytes(), &s, None, NOW),
            Err(Refusal::Signature)
        );
        // The RSA key's claims after its exp.
        assert_eq!(
            verify(RSA_TOKEN.as_bytes(), &s, None, 2_000_000_030),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn rsa_keys_below_2048_bits_are_refused() {
        let e = Settings::from_toml(&format!(
            "[[keys]]\nalg = \"RS256\"\npublic_key = \"\"\"\n{RSA_1024_PEM}\"\"\"\n"
        ))
        .err()
        .unwrap();
        assert!(e.contains("1024 bits"), "{e}");
    }

    #[test]
    fn alg_none_and_unknown_algorithms_are_refused() {
        let s = settings("");
        let none = format!("{}.", unsigned(r#"{"alg":"none"}"#, GOOD));
        assert_eq!(
            verify(none.as_bytes(), &s, None, NOW),
            Err(Refusal::Algorithm("none".into()))
        );
        // Even with a valid HMAC in the signature slot.
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        let input = unsigned(r#"{"alg":"none"}"#, GOOD);
        mac.update(input.as_bytes());
        let none_signed = format!("{input}.{}", b64(&mac.finalize().into_bytes()));
        assert!(matches!(
            verify(none_signed.as_bytes(), &s, None, NOW),
            Err(Refusal::Algorithm(_))
        ));
        for alg in ["HS512", "PS256", "ES384", "hs256", "RS256 "] {
            let t = hs256_with(SECRET.as_bytes(), &format!(r#"{{"alg":"{alg}"}}"#), GOOD);
            assert!(
                matches!(
                    verify(t.as_bytes(), &s, None, NOW),
                    Err(Refusal::Algorithm(_))
                ),
                "{alg}"
            );
        }
    }

    #[test]
    fn no_algorithm_confusion() {
        // Only an RS256 key: an HS256 token "signed" with the public key text as the
        // secret is refused without the key ever being used as an HMAC secret.
        let s = only(&format!(
            "[[keys]]\nalg = \"RS256\"\npublic_key = \"\"\"\n{RSA_PUBLIC_PEM}\"\"\"\n"
        ));
        let t = hs256_with(RSA_PUBLIC_PEM.as_bytes(), r#"{"alg":"HS256"}"#, GOOD);
        assert_eq!(
            verify(t.as_bytes(), &s, None, NOW),
            Err(Refusal::Algorithm("HS256".into()))
        );
        // Only an ES256 key: a valid HS256 token is refused.
        let (key, pem) = es256_key(1);
        let s = only(&format!(
            "[[keys]]\nalg = \"ES256\"\npublic_key = \"\"\"\n{pem}\"\"\"\n"
        ));
        assert!(matches!(
            verify(hs256(GOOD).as_bytes(), &s, None, NOW),
            Err(Refusal::Algorithm(_))
        ));
        // An ES256 signature relabelled RS256 meets only RSA keys.
        let t = es256_with(&key, r#"{"alg":"RS256","kid":"rsa-1"}"#, GOOD);
        assert_eq!(
            verify(t.as_bytes(), &settings(""), None, NOW),
            Err(Refusal::Signature)
        );
    }

    #[test]
    fn wrong_secret_is_a_bad_signature() {
        let t = hs256_with(&[7u8; 32], r#"{"alg":"HS256"}"#, GOOD);
        assert_eq!(
            verify(t.as_bytes(), &settings(""), None, NOW),
            Err(Refusal::Signature)
        );
    }

    #[test]
    fn expiry_and_not_before_with_leeway() {
        let s = settings("leeway_s = 10");
        let exp = |e: &str| hs256(&format!(r#"{{"sub":"a","exp":{e}}}"#));
        assert!(verify(exp("1700000000").as_bytes(), &s, None, NOW - 10).is_ok());
        assert!(verify(exp("1700000000").as_bytes(), &s, None, NOW + 9).is_ok());
        assert_eq!(
            verify(exp("1700000000").as_bytes(), &s, None, NOW + 10),
            Err(Refusal::Expired)
        );
        assert_eq!(
            verify(exp("1.5").as_bytes(), &s, None, NOW),
            Err(Refusal::Expired)
        );
        assert!(verify(exp("1700000005.5").as_bytes(), &s, None, NOW).is_ok());
        assert!(verify(exp("1e300").as_bytes(), &s, None, NOW).is_ok());
        assert!(verify(exp("18446744073709551615").as_bytes(), &s, None, NOW).is_ok());
        assert_eq!(
            verify(exp("\"tomorrow\"").as_bytes(), &s, None, NOW),
            Err(Refusal::Malformed("a time claim is not a number"))
        );
        let nbf = |n: u64| hs256(&format!(r#"{{"sub":"a","exp":1800000000,"nbf":{n}}}"#));
        assert!(verify(nbf(NOW + 10).as_bytes(), &s, None, NOW).is_ok());
        assert_eq!(
            verify(nbf(NOW + 11).as_bytes(), &s, None, NOW),
            Err(Refusal::NotYetValid)
        );
        // exp is required unless configured otherwise.
        let no_exp = hs256(r#"{"sub":"a"}"#);
        assert_eq!(
            verify(no_exp.as_bytes(), &s, None, NOW),
            Err(Refusal::MissingExp)
        );
        let lax = settings("require_exp = false");
        assert!(verify(no_exp.as_bytes(), &lax, None, NOW).is_ok());
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let s = settings("issuer = [\"i1\", \"i2\"]\naudience = \"mqtt\"");
        let t = |claims: &str| verify(hs256(claims).as_bytes(), &s, None, NOW);
        assert!(t(r#"{"sub":"a","exp":1800000000,"iss":"i2","aud":"mqtt"}"#).is_ok());
        assert!(t(r#"{"sub":"a","exp":1800000000,"iss":"i1","aud":["x","mqtt"]}"#).is_ok());
        assert_eq!(
            t(r#"{"sub":"a","exp":1800000000,"iss":"i3","aud":"mqtt"}"#),
            Err(Refusal::Issuer)
        );
        assert_eq!(
            t(r#"{"sub":"a","exp":1800000000,"aud":"mqtt"}"#),
            Err(Refusal::Issuer)
        );
        assert_eq!(
            t(r#"{"sub":"a","exp":1800000000,"iss":"i1","aud":["x"]}"#),
            Err(Refusal::Audience)
        );
        assert_eq!(
            t(r#"{"sub":"a","exp":1800000000,"iss":"i1","aud":7}"#),
            Err(Refusal::Audience)
        );
        // Not configured: not checked.
        let any = settings("");
        assert!(
            verify(
                hs256(r#"{"sub":"a","exp":1800000000,"iss":"zz","aud":"q"}"#).as_bytes(),
                &any,
                None,
                NOW
            )
            .is_ok()
        );
    }

    #[test]
    fn username_claim_and_match() {
        let s = settings("username_claim = \"client\"\nusername_must_match = true");
        let t = hs256(r#"{"sub":"a","client":"dev-7","exp":1800000000}"#);
        assert_eq!(
            verify(t.as_bytes(), &s, None, NOW).unwrap().username,
            "dev-7"
        );
        assert!(verify(t.as_bytes(), &s, Some("dev-7"), NOW).is_ok());
        assert!(verify(t.as_bytes(), &s, Some(""), NOW).is_ok());
        assert_eq!(
            verify(t.as_bytes(), &s, Some("dev-8"), NOW),
            Err(Refusal::UsernameMismatch)
        );
        // Without username_must_match, the CONNECT's user name is simply replaced.
        assert!(
            verify(
                t.as_bytes(),
                &settings("username_claim = \"client\""),
                Some("x"),
                NOW
            )
            .is_ok()
        );
        for claims in [
            r#"{"exp":1800000000}"#,
            r#"{"client":"","exp":1800000000}"#,
            r#"{"client":5,"exp":1800000000}"#,
        ] {
            assert_eq!(
                verify(hs256(claims).as_bytes(), &s, None, NOW),
                Err(Refusal::NoUsername),
                "{claims}"
            );
        }
    }

    #[test]
    fn topic_claims_are_validated() {
        let s = settings("publish_claim = \"w\"\nsubscribe_claim = \"r\"");
        let id = verify(
            hs256(r#"{"sub":"a","exp":1800000000,"w":["a/b","c/#"],"publish":["ignored"]}"#)
                .as_bytes(),
            &s,
            None,
            NOW,
        )
        .unwrap();
        assert_eq!(id.publish, ["a/b", "c/#"]);
        assert!(id.subscribe.is_empty());
        for claims in [
            r#"{"sub":"a","exp":1800000000,"w":["a/#/b"]}"#,
            r#"{"sub":"a","exp":1800000000,"r":[""]}"#,
            r#"{"sub":"a","exp":1800000000,"r":[1]}"#,
            r#"{"sub":"a","exp":1800000000,"r":{"a":1}}"#,
        ] {
            assert!(
                matches!(
                    verify(hs256(claims).as_bytes(), &s, None, NOW),
                    Err(Refusal::TopicClaim(_))
                ),
                "{claims}"
            );
        }
    }

    #[test]
    fn crit_and_bad_kid_are_refused() {
        let s = settings("");
        let t = hs256_with(
            SECRET.as_bytes(),
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            GOOD,
        );
        assert_eq!(verify(t.as_bytes(), &s, None, NOW), Err(Refusal::Critical));
        let t = hs256_with(SECRET.as_bytes(), r#"{"alg":"HS256","kid":7}"#, GOOD);
        assert_eq!(
            verify(t.as_bytes(), &s, None, NOW),
            Err(Refusal::Malformed("`kid` is not a string"))
        );
    }

    #[test]
    fn not_a_jwt() {
        for p in [
            &b"plain password"[..],
            b"",
            b"a.b.c",
            b"..",
            b"\xff\xfe.x.y",
            b"eyJhbGciOiJIUzI1NiJ9.e30",
            b"eyJhbGciOiJIUzI1NiJ9.e30.x.y",
            b"eyJ0eXAiOiJKV1QifQ.e30.x", // no alg
            b"W10.e30.x",                // header is an array
        ] {
            assert!(!looks_like_jwt(p), "{p:?}");
            assert_eq!(
                verify(p, &settings(""), None, NOW),
                Err(Refusal::NotAJwt),
                "{p:?}"
            );
        }
        assert!(looks_like_jwt(hs256(GOOD).as_bytes()));
    }

    #[test]
    fn malformed_parts_after_a_valid_header() {
        let s = settings("");
        let header = b64(br#"{"alg":"HS256"}"#);
        assert_eq!(
            verify(format!("{header}.e30.!!!").as_bytes(), &s, None, NOW),
            Err(Refusal::Malformed("signature is not base64url"))
        );
        // Padding is not base64url-without-padding.
        let t = hs256(GOOD);
        assert!(verify(format!("{t}=").as_bytes(), &s, None, NOW).is_err());
        // A payload that is not JSON, correctly signed.
        let input = format!("{header}.{}", b64(b"not json"));
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(input.as_bytes());
        let t = format!("{input}.{}", b64(&mac.finalize().into_bytes()));
        assert_eq!(
            verify(t.as_bytes(), &s, None, NOW),
            Err(Refusal::Malformed("payload is not a JSON object"))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: mutations of valid tokens and random-ish strings.
        let s = settings("");
        let (key, _) = es256_key(1);
        let seeds = [
            hs256(GOOD),
            es256_with(&key, r#"{"alg":"ES256"}"#, GOOD),
            RSA_TOKEN.to_owned(),
        ];
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for seed in &seeds {
            for _ in 0..100 {
                let mut t = seed.clone().into_bytes();
                for _ in 0..(next() % 4 + 1) {
                    let len = t.len();
                    let i = usize::try_from(next()).unwrap() % len;
                    match next() % 3 {
                        0 => t[i] = u8::try_from(next() % 256).unwrap(),
                        1 => t.truncate(i),
                        _ => t.insert(i, b'.'),
                    }
                    if t.is_empty() {
                        break;
                    }
                }
                let _ = verify(&t, &s, Some("u"), NOW);
            }
        }
    }
}
