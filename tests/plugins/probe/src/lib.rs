//! A plugin whose hooks leave traces the end-to-end tests can see, set by its sidecar's
//! `[config]`:
//!
//! - `transform` (when `tag` is set): a payload `drop` is dropped, `reject:NN` is rejected
//!   with reason code 0xNN, anything else becomes `tag + payload` (so two probes in a
//!   chain show their order); a topic ending in `/move` is published on `moved/...`.
//! - `deliver` (when `deliver_tag` is set): a payload containing `secret` is dropped for
//!   subscribers whose client id starts with `nosecret`; others get `payload + deliver_tag
//!   + client id`.
//! - `authorize` (when `authorize` = true): a will on `forbidden-will/...` and retained
//!   messages on `hidden/...` are denied; everything else is ignored.
//! - `authenticate`: MQTT 5 enhanced authentication with the method `probe-challenge`:
//!   the challenge is `nonce`, the right answer `answer:nonce`, and success carries
//!   `welcome`; other clients are ignored.
//! - `events` (when `events` = true): every event is published, through the `publish`
//!   import, as a QoS 1 message on `probe-events/<kind>` with the client id (or topic) as
//!   payload.

#![allow(
    unsafe_code,
    reason = "the bindings wit_bindgen::generate! writes here export the hooks by symbol \
              name; the probe makes its own to export every hook of the world at once"
)]

wit_bindgen::generate!({
    path: "../../../wit",
    inline: "
        package test:probe;
        world probe {
            include sandpiper:plugin/transformer@0.1.1;
            include sandpiper:plugin/deliverer@0.1.1;
            include sandpiper:plugin/observer@0.1.1;
            include sandpiper:plugin/authorizer@0.1.1;
            include sandpiper:plugin/authenticator@0.1.1;
        }
    ",
    world: "test:probe/probe",
    generate_all,
});

use exports::sandpiper::plugin::authenticate::{
    Challenge, ConnectInfo, Decision as AuthDecision, Grant, Step,
};
use exports::sandpiper::plugin::authorize::{Action, Decision, Request};
use exports::sandpiper::plugin::events::{DropReason, Event};
use sandpiper::plugin::config;
use sandpiper::plugin::publish;
use sandpiper::plugin::types::{Client, Message, MessageProperties, Outcome, Qos};

struct Probe;

impl exports::sandpiper::plugin::authenticate::Guest for Probe {
    fn authenticate(info: ConnectInfo) -> AuthDecision {
        if info.auth_method.as_deref() != Some("probe-challenge") {
            return AuthDecision::Ignore;
        }
        AuthDecision::Continue(Challenge {
            auth_data: b"nonce".to_vec(),
            state: b"s1".to_vec(),
        })
    }

    fn auth_step(step: Step) -> AuthDecision {
        if step.state == b"s1" && step.auth_data.as_deref() == Some(b"answer:nonce".as_slice()) {
            AuthDecision::Allow(Grant {
                username: Some(format!("challenged-{}", step.client_id)),
                attributes: Vec::new(),
                auth_data: Some(b"welcome".to_vec()),
            })
        } else {
            AuthDecision::Deny(0x87)
        }
    }
}

impl exports::sandpiper::plugin::authorize::Guest for Probe {
    fn authorize(_client: Client, requests: Vec<Request>) -> Vec<Decision> {
        let on = config::get("authorize").as_deref() == Some("true");
        requests
            .iter()
            .map(|r| match r.action {
                Action::Will if on && r.topic.starts_with("forbidden-will/") => {
                    Decision::Deny(0x87)
                }
                Action::Retained if on && r.topic.starts_with("hidden/") => Decision::Deny(0x87),
                _ => Decision::Ignore,
            })
            .collect()
    }
}

impl exports::sandpiper::plugin::transform::Guest for Probe {
    fn transform(_publisher: Client, messages: Vec<Message>) -> Vec<Outcome> {
        let Some(tag) = config::get("tag") else {
            return messages.iter().map(|_| Outcome::Keep).collect();
        };
        messages
            .into_iter()
            .map(|mut m| {
                if m.payload == b"drop" {
                    return Outcome::Drop;
                }
                if let Some(code) = m.payload.strip_prefix(b"reject:") {
                    let code = std::str::from_utf8(code)
                        .ok()
                        .and_then(|c| u8::from_str_radix(c, 16).ok())
                        .unwrap_or(0x87);
                    return Outcome::Reject(code);
                }
                let mut payload = tag.clone().into_bytes();
                payload.extend_from_slice(&m.payload);
                m.payload = payload;
                if let Some(rest) = m.topic.strip_suffix("/move") {
                    m.topic = format!("moved/{rest}");
                }
                Outcome::Replace(m)
            })
            .collect()
    }
}

impl exports::sandpiper::plugin::deliver::Guest for Probe {
    fn deliver(subscriber: Client, messages: Vec<Message>) -> Vec<Outcome> {
        let Some(tag) = config::get("deliver_tag") else {
            return messages.iter().map(|_| Outcome::Keep).collect();
        };
        messages
            .into_iter()
            .map(|mut m| {
                let secret = m.payload.windows(6).any(|w| w == b"secret");
                if secret && subscriber.client_id.starts_with("nosecret") {
                    return Outcome::Drop;
                }
                m.payload.extend_from_slice(tag.as_bytes());
                m.payload.extend_from_slice(subscriber.client_id.as_bytes());
                Outcome::Replace(m)
            })
            .collect()
    }
}

impl exports::sandpiper::plugin::events::Guest for Probe {
    fn on_events(events: Vec<Event>) {
        if config::get("events").as_deref() != Some("true") {
            return;
        }
        for e in events {
            let (kind, text) = match e {
                Event::Connected(c) => ("connected", c.client.client_id),
                Event::Disconnected(d) => (
                    "disconnected",
                    format!("{}:{:?}", d.client.client_id, d.reason),
                ),
                Event::Subscribed(s) => {
                    ("subscribed", format!("{}:{}", s.client.client_id, s.filter))
                }
                Event::Unsubscribed(s) => (
                    "unsubscribed",
                    format!("{}:{}", s.client.client_id, s.filter),
                ),
                Event::SessionExpired(id) => ("session-expired", id),
                Event::MessageDropped(d) => {
                    let why = match d.reason {
                        DropReason::QueueFull => "queue-full",
                        DropReason::Expired => "expired",
                        DropReason::TooLarge => "too-large",
                        DropReason::Plugin => "plugin",
                    };
                    (
                        "message-dropped",
                        format!("{}:{}:{why}", d.client_id, d.topic),
                    )
                }
            };
            if text.starts_with("probe-") || text.contains(":probe-events/") {
                // The test's own observers: not reported, so the trace stays readable.
                continue;
            }
            let _ = publish::publish(&Message {
                topic: format!("probe-events/{kind}"),
                payload: text.into_bytes(),
                qos: Qos::AtLeastOnce,
                retain: false,
                properties: MessageProperties {
                    payload_utf8: true,
                    expiry_interval: None,
                    content_type: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                },
            });
        }
    }
}

export!(Probe);
