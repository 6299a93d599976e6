//! The bundled `jwt-auth` plugin through the binary: HS256 and ES256 tokens (signed here,
//! with ring) as CONNECT passwords, refusals with 0x86 (3.1.1: return code 4) for
//! expired, forged, unsigned and wrongly-keyed tokens, and the token's topic claims
//! enforced on SUBSCRIBE, PUBLISH, wills and retained delivery.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use rumqttc::v5::mqttbytes::v5::PubAckReason;

use crate::harness::{Broker, queue, v3, v5};
use crate::plugins::{broker_with, bundled, wait_for_log};

/// The HS256 secret of the tests' sidecars (at least 32 bytes, as the plugin requires).
const SECRET: &str = "e2e-shared-secret-of-32-bytes-or-more";

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn unix_now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    i64::try_from(secs).unwrap()
}

/// `BASE64URL(header).BASE64URL(claims)`: what the signature covers.
fn signing_input(header: &str, claims: &str) -> String {
    format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()))
}

/// A compact JWS with an HS256 signature made with `secret`, whatever `header` says.
fn hs256(secret: &[u8], header: &str, claims: &str) -> String {
    let input = signing_input(header, claims);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

/// A P-256 key pair for ES256 tokens, fresh per test.
struct Es256 {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Es256 {
    fn new() -> Es256 {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Es256 { pair, rng }
    }

    /// The public key as PEM SubjectPublicKeyInfo: the fixed DER prefix for an
    /// id-ecPublicKey on prime256v1 (RFC 5480), then the uncompressed point.
    fn public_pem(&self) -> String {
        const SPKI_P256_PREFIX: [u8; 26] = [
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        let mut der = SPKI_P256_PREFIX.to_vec();
        der.extend_from_slice(self.pair.public_key().as_ref());
        let body = STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    /// A compact JWS with an ES256 signature (R || S, as JWS wants: ring's FIXED form).
    fn sign(&self, header: &str, claims: &str) -> String {
        let input = signing_input(header, claims);
        let sig = self.pair.sign(&self.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", b64(sig.as_ref()))
    }
}

/// Claims for `sub`, valid for five more minutes, with these topic claims (JSON arrays).
fn claims(sub: &str, publish: &str, subscribe: &str) -> String {
    format!(
        r#"{{"sub":"{sub}","exp":{},"publish":{publish},"subscribe":{subscribe}}}"#,
        unix_now() + 300
    )
}

/// A sidecar with the tests' HS256 secret (unless `hs256` is false) and the ES256 key
/// `es` under kid "ec".
fn sidecar(hs256: bool, es: &Es256) -> String {
    let mut text = String::from("[config]\n");
    if hs256 {
        text.push_str(&format!(
            "[[config.keys]]\nalg = \"HS256\"\nsecret = \"{SECRET}\"\n"
        ));
    }
    text.push_str(&format!(
        "[[config.keys]]\nkid = \"ec\"\nalg = \"ES256\"\npublic_key = \"\"\"\n{}\"\"\"\n",
        es.public_pem()
    ));
    text
}

async fn jwt_broker(hs256: bool, es: &Es256) -> Broker {
    let broker = broker_with("jwt-auth", &bundled("jwt-auth"), &sidecar(hs256, es)).await;
    wait_for_log(&broker, "plugin loaded").await;
    broker
}

fn v5_with(broker: &Broker, id: &str, user: &str, token: &str) -> v5::MqttOptions {
    let mut o = v5::options(broker, id);
    o.set_credentials(user, token);
    o
}

fn v3_with(broker: &Broker, id: &str, user: &str, token: &str) -> v3::MqttOptions {
    let mut o = v3::options(broker, id);
    o.set_credentials(user, token);
    o
}

/// Publishes at QoS 1 and returns the PUBACK's reason code.
async fn publish_v5(c: &mut v5::Client, topic: &str, retain: bool, payload: &[u8]) -> PubAckReason {
    queue(
        c.client.publish(
            topic,
            v5::QoS::AtLeastOnce,
            retain,
            bytes::Bytes::copy_from_slice(payload),
        ),
        "PUBLISH",
    )
    .await;
    match c
        .inbox
        .take("PUBACK", |p| matches!(p, v5::Packet::PubAck(_)))
        .await
    {
        v5::Packet::PubAck(ack) => ack.reason,
        _ => unreachable!("filtered to PUBACK"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_connect_and_their_topic_claims_are_enforced() {
    let es = Es256::new();
    let broker = jwt_broker(true, &es).await;

    // An HS256 token: its own devices subtree, plus alerts one level deep.
    let token = hs256(
        SECRET.as_bytes(),
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &claims(
            "alice",
            r#"["devices/%c/#"]"#,
            r#"["devices/%c/#","alerts/+"]"#,
        ),
    );
    let mut dev1 = v5::Client::connect(v5_with(&broker, "dev1", "alice", &token)).await;
    assert_eq!(dev1.connack.code, v5::ConnectReturnCode::Success);
    let q1 = v5::QoS::AtLeastOnce;
    let codes = dev1
        .subscribe_filters(
            vec![
                v5::Filter::new("devices/dev1/#", q1),
                v5::Filter::new("alerts/+", q1),
                v5::Filter::new("#", q1),
                v5::Filter::new("devices/dev2/#", q1),
                // alerts/+ does not cover alerts/# (which matches alerts/a/b).
                v5::Filter::new("alerts/#", q1),
            ],
            None,
        )
        .await;
    assert_eq!(
        codes,
        vec![
            v5::SubscribeReasonCode::Success(q1),
            v5::SubscribeReasonCode::Success(q1),
            v5::SubscribeReasonCode::NotAuthorized,
            v5::SubscribeReasonCode::NotAuthorized,
            v5::SubscribeReasonCode::NotAuthorized,
        ]
    );
    // Allowed publish comes back; a denied one is refused (PUBACK 0x87) and not routed,
    // though dev1 itself subscribes to alerts/+.
    assert_eq!(
        publish_v5(&mut dev1, "devices/dev1/temp", false, b"21").await,
        PubAckReason::Success
    );
    assert_eq!(v5::topic(&dev1.recv().await), "devices/dev1/temp");
    assert_eq!(
        publish_v5(&mut dev1, "alerts/fire", false, b"no").await,
        PubAckReason::NotAuthorized
    );
    dev1.expect_silence().await;

    // An ES256 token (kid "ec") may publish to alerts: dev1 receives it.
    let token = es.sign(
        r#"{"alg":"ES256","typ":"JWT","kid":"ec"}"#,
        &claims("bob", r#"["alerts/+"]"#, r#"[]"#),
    );
    let mut dev2 = v5::Client::connect(v5_with(&broker, "dev2", "", &token)).await;
    assert_eq!(dev2.connack.code, v5::ConnectReturnCode::Success);
    assert_eq!(
        publish_v5(&mut dev2, "alerts/smoke", false, b"yes").await,
        PubAckReason::Success
    );
    let p = dev1.recv().await;
    assert_eq!(
        (v5::topic(&p).as_str(), &p.payload[..]),
        ("alerts/smoke", &b"yes"[..])
    );

    // Retained delivery follows the subscribe claim: dev1 gets alerts/+'s retained message.
    assert_eq!(
        publish_v5(&mut dev2, "alerts/flood", true, b"kept").await,
        PubAckReason::Success
    );
    assert_eq!(v5::topic(&dev1.recv().await), "alerts/flood");
    let mut dev3 = v5::Client::connect(v5_with(
        &broker,
        "dev3",
        "",
        &hs256(
            SECRET.as_bytes(),
            r#"{"alg":"HS256"}"#,
            &claims("carol", "[]", r#"["alerts/+"]"#),
        ),
    ))
    .await;
    dev3.subscribe_ok("alerts/+", q1).await;
    let p = dev3.recv().await;
    assert_eq!((v5::topic(&p).as_str(), p.retain), ("alerts/flood", true));

    // A will must be on a topic of the publish claim (MQTT 5: a denied will is 0x87).
    let will_token = hs256(
        SECRET.as_bytes(),
        r#"{"alg":"HS256"}"#,
        &claims("dave", r#"["devices/%c/#"]"#, "[]"),
    );
    for (topic, ok) in [("devices/dev4/status", true), ("alerts/gone", false)] {
        let mut o = v5_with(&broker, "dev4", "dave", &will_token);
        o.set_last_will(v5::LastWill::new(topic, "bye", q1, false, None));
        match v5::Client::try_connect(o).await {
            Ok(c) if ok => c.disconnect().await,
            Ok(_) => panic!("a will on {topic} must be refused"),
            Err(e) if ok => panic!("a will on {topic} must be accepted: {e:?}"),
            Err(e) => assert!(
                matches!(
                    e,
                    v5::ConnectionError::ConnectionRefused(v5::ConnectReturnCode::NotAuthorized)
                ),
                "{e:?}"
            ),
        }
    }

    dev1.disconnect().await;
    dev2.disconnect().await;
    dev3.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_claims_apply_to_mqtt_311_clients() {
    let es = Es256::new();
    let broker = jwt_broker(true, &es).await;
    // 3.1.1 sends a password only with a user name; the token's `sub` replaces it, so
    // %u is the token's subject.
    let token = hs256(
        SECRET.as_bytes(),
        r#"{"alg":"HS256"}"#,
        &claims("erin", r#"["users/%u/#"]"#, r#"["users/%u/#"]"#),
    );
    let mut c = v3::Client::connect(v3_with(&broker, "old-1", "anything", &token)).await;
    assert_eq!(c.connack.code, v3::ConnectReturnCode::Success);
    c.subscribe_ok("users/erin/#", v3::QoS::AtLeastOnce).await;
    assert_eq!(
        c.subscribe("users/anything/#", v3::QoS::AtLeastOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    // A denied publish is acknowledged and dropped (3.1.1 cannot refuse one).
    c.publish("users/other/x", v3::QoS::AtLeastOnce, false, b"no")
        .await;
    c.publish("users/erin/x", v3::QoS::AtLeastOnce, false, b"yes")
        .await;
    assert_eq!(c.recv().await.topic, "users/erin/x");
    c.expect_silence().await;
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_bad_user_name_or_password() {
    let es = Es256::new();
    let broker = jwt_broker(true, &es).await;
    let good = claims("mallory", r##"["#"]"##, r##"["#"]"##);
    let expired = format!(r#"{{"sub":"mallory","exp":{}}}"#, unix_now() - 3600);
    let hs = r#"{"alg":"HS256"}"#;
    let cases = [
        ("expired", hs256(SECRET.as_bytes(), hs, &expired)),
        (
            "wrong-secret",
            hs256(b"another-secret-that-is-long-enough!!", hs, &good),
        ),
        (
            "alg-none",
            format!("{}.", signing_input(r#"{"alg":"none"}"#, &good)),
        ),
        (
            "alg-none-signed",
            hs256(SECRET.as_bytes(), r#"{"alg":"none"}"#, &good),
        ),
        (
            "foreign-es256",
            Es256::new().sign(r#"{"alg":"ES256","kid":"ec"}"#, &good),
        ),
        ("not-a-jwt", "hunter2".to_owned()),
    ];
    for (id, token) in &cases {
        let r = v5::Client::try_connect(v5_with(&broker, id, "mallory", token)).await;
        match r {
            Err(v5::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, v5::ConnectReturnCode::BadUserNamePassword, "{id}");
            }
            Err(e) => panic!("{id}: expected CONNACK 0x86, got {e:?}"),
            Ok(_) => panic!("{id}: a bad token must be refused"),
        }
        // 3.1.1: return code 4, bad user name or password.
        let r = v3::Client::try_connect(v3_with(&broker, id, "mallory", token)).await;
        match r {
            Err(v3::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, v3::ConnectReturnCode::BadUserNamePassword, "{id}");
            }
            Err(e) => panic!("{id} (3.1.1): expected return code 4, got {e:?}"),
            Ok(_) => panic!("{id} (3.1.1): a bad token must be refused"),
        }
    }
    wait_for_log(&broker, "token expired").await;

    // Only an ES256 key configured: a correctly signed HS256 token is refused (the public
    // key is never used as an HMAC secret), an ES256 one gets in.
    let broker = jwt_broker(false, &es).await;
    let r = v5::Client::try_connect(v5_with(
        &broker,
        "hs-only",
        "",
        &hs256(SECRET.as_bytes(), hs, &good),
    ))
    .await;
    assert!(
        matches!(
            r,
            Err(v5::ConnectionError::ConnectionRefused(
                v5::ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "HS256 without an HS256 key: {:?}",
        r.err()
    );
    let ok = es.sign(r#"{"alg":"ES256","kid":"ec"}"#, &good);
    v5::Client::connect(v5_with(&broker, "es-ok", "", &ok))
        .await
        .disconnect()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_password_are_left_to_the_listener() {
    let es = Es256::new();
    // allow_anonymous (the default): jwt-auth ignores the client in both hooks.
    let broker = jwt_broker(true, &es).await;
    let mut anon = v3::Client::connect(v3::options(&broker, "anon")).await;
    anon.subscribe_ok("#", v3::QoS::AtMostOnce).await;
    anon.disconnect().await;
    drop(broker);

    // allow_anonymous = false: refused by the listener, while a token gets in.
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::write(plugins.join("jwt-auth.toml"), sidecar(true, &es)).unwrap();
    std::fs::copy(bundled("jwt-auth"), plugins.join("jwt-auth.wasm")).unwrap();
    let broker = Broker::start_config_in(
        dir,
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = false\n",
    );
    wait_for_log(&broker, "plugin loaded").await;
    let r = v3::Client::try_connect(v3::options(&broker, "anon")).await;
    assert!(r.is_err(), "anonymous must be refused");
    let token = hs256(
        SECRET.as_bytes(),
        r#"{"alg":"HS256"}"#,
        &claims("frank", "[]", "[]"),
    );
    v3::Client::connect(v3_with(&broker, "frank", "frank", &token))
        .await
        .disconnect()
        .await;
}
