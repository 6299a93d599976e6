//! The message hooks: `transform` (per publisher, on what one read decoded) and `deliver`
//! (per subscriber, on what one write carries), and the conversions between the broker's
//! messages and the contract's.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::bindings::sandpiper::plugin::types;
use super::sidecar::PassFailure;
use super::{Chain, ClientInfo, Hooks, Plugins, qos_from_wit, qos_to_wit};
use crate::codec::{MessageProperties, QoS, TopicName, UserProperties};
use crate::message::{Delivery, Message};

/// A message on its way in, before routing: what `transform` may change.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Topic name.
    pub topic: TopicName,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// MQTT 5 properties.
    pub properties: MessageProperties,
}

/// What the transform chain decided for one draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Route it (possibly changed).
    Route,
    /// Accepted and dropped.
    Drop,
    /// Refused with this reason code (see `outcome.reject` in `wit/types.wit`).
    Reject(u8),
}

/// Why a message from a plugin cannot become a [`Draft`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadMessage {
    /// Topic (or Response Topic) is not a valid topic name.
    Topic,
}

pub(super) fn client_to_wit(c: &ClientInfo) -> types::Client {
    types::Client {
        client_id: c.client_id.to_string(),
        username: c.username.clone(),
        listener: c.listener.to_string(),
        attributes: super::attrs(&c.attributes),
    }
}

fn props_to_wit(p: &MessageProperties) -> types::MessageProperties {
    types::MessageProperties {
        payload_utf8: p.payload_format_indicator.unwrap_or(false),
        expiry_interval: p.message_expiry_interval,
        content_type: p.content_type.as_deref().map(str::to_owned),
        response_topic: p.response_topic.as_ref().map(|t| t.as_str().to_owned()),
        correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
        user_properties: p
            .user_properties
            .as_slice()
            .iter()
            .map(|(n, v)| types::UserProperty {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
    }
}

fn props_from_wit(p: types::MessageProperties) -> Result<MessageProperties, BadMessage> {
    let response_topic = match p.response_topic {
        Some(t) => Some(TopicName::new(&t).map_err(|_| BadMessage::Topic)?),
        None => None,
    };
    Ok(MessageProperties {
        payload_format_indicator: p.payload_utf8.then_some(true),
        message_expiry_interval: p.expiry_interval,
        content_type: p.content_type.map(Arc::from),
        response_topic,
        correlation_data: p.correlation_data.map(Bytes::from),
        user_properties: UserProperties::new(
            p.user_properties
                .into_iter()
                .map(|u| (Arc::from(u.name), Arc::from(u.value)))
                .collect(),
        ),
    })
}

impl Draft {
    fn to_wit(&self) -> types::Message {
        types::Message {
            topic: self.topic.as_str().to_owned(),
            payload: self.payload.to_vec(),
            qos: qos_to_wit(self.qos),
            retain: self.retain,
            properties: props_to_wit(&self.properties),
        }
    }

    /// The message this draft becomes once routed, published by session `origin` (0: the
    /// broker or a plugin); its expiry counts from now.
    pub fn into_message(self, origin: crate::message::ClientKey) -> Arc<Message> {
        let now = std::time::Instant::now();
        Arc::new(Message {
            expires_at: self
                .properties
                .message_expiry_interval
                .map(|s| now + std::time::Duration::from_secs(u64::from(s))),
            topic: self.topic,
            payload: self.payload,
            qos: self.qos,
            retain: self.retain,
            properties: self.properties,
            origin,
        })
    }

    /// A draft from a plugin's message (a `replace` outcome or the `publish` import),
    /// whose topic must be within `limits`.
    pub fn from_wit(
        m: types::Message,
        limits: &crate::config::TopicLimits,
    ) -> Result<Draft, BadMessage> {
        if m.topic.len() > usize::from(u16::MAX) || !limits.fits(&m.topic) {
            return Err(BadMessage::Topic);
        }
        Ok(Draft {
            topic: TopicName::new(&m.topic).map_err(|_| BadMessage::Topic)?,
            payload: Bytes::from(m.payload),
            qos: qos_from_wit(m.qos),
            retain: m.retain,
            properties: props_from_wit(m.properties)?,
        })
    }
}

pub(super) fn message_to_wit(m: &Message, qos: QoS, retain: bool) -> types::Message {
    types::Message {
        topic: m.topic.as_str().to_owned(),
        payload: m.payload.to_vec(),
        qos: qos_to_wit(qos),
        retain,
        properties: props_to_wit(&m.properties),
    }
}

impl Plugins {
    /// Runs the transform chain over the drafts one read of `publisher` produced (all of
    /// them `Fate::Route` on entry), skipping the plugin named `skip` (a plugin's own
    /// publishes). Synchronous, like [`Plugins::authorize`].
    pub fn transform(
        &self,
        publisher: &ClientInfo,
        drafts: &mut [Draft],
        fates: &mut [Fate],
        skip: Option<&str>,
    ) {
        if self.hooks() & Hooks::TRANSFORM == 0 || drafts.is_empty() {
            return;
        }
        let chain = self.chain();
        let limits = &self.outbox.topics;
        let run = || transform_chain(&chain, publisher, drafts, fates, skip, limits);
        self.blocking(run);
    }

    /// Runs the deliver chain over the deliveries about to be written to `subscriber` that
    /// have not passed it yet; replaced ones are changed in place, dropped ones are taken
    /// out of `batch` and returned.
    pub fn deliver(
        &self,
        subscriber: &ClientInfo,
        batch: &mut VecDeque<Delivery>,
    ) -> Vec<Delivery> {
        if self.hooks() & Hooks::DELIVER == 0 || batch.iter().all(|d| d.hooked) {
            return Vec::new();
        }
        let chain = self.chain();
        let limits = &self.outbox.topics;
        self.blocking(|| deliver_chain(&chain, subscriber, batch, limits))
    }
}

fn transform_chain(
    chain: &Chain,
    publisher: &ClientInfo,
    drafts: &mut [Draft],
    fates: &mut [Fate],
    skip: Option<&str>,
    limits: &crate::config::TopicLimits,
) {
    let mut wit_client = None;
    for p in &chain.plugins {
        if !p.hooks.has(Hooks::TRANSFORM) || skip == Some(&*p.name) {
            continue;
        }
        let idx: Vec<usize> = (0..drafts.len())
            .filter(|&i| fates[i] == Fate::Route && p.sidecar.selects(drafts[i].topic.as_str()))
            .collect();
        if idx.is_empty() {
            continue;
        }
        let client = wit_client.get_or_insert_with(|| client_to_wit(publisher));
        let batch: Vec<types::Message> = idx.iter().map(|&i| drafts[i].to_wit()).collect();
        let _span = tracing::debug_span!("plugin", plugin = %p.name, hook = "transform").entered();
        let r = p
            .call("transform", |s| match &s.guests.transform {
                Some(g) => g.call_transform(&mut s.store, client, &batch),
                None => Ok(vec![types::Outcome::Keep; batch.len()]),
            })
            .and_then(|o| {
                if o.len() == batch.len() {
                    Ok(o)
                } else {
                    Err(p.arity("transform", batch.len(), o.len()))
                }
            });
        match r {
            Ok(outcomes) => {
                for (&i, o) in idx.iter().zip(outcomes) {
                    match o {
                        types::Outcome::Keep => {}
                        types::Outcome::Drop => fates[i] = Fate::Drop,
                        types::Outcome::Reject(code) => fates[i] = Fate::Reject(code),
                        types::Outcome::Replace(m) => match Draft::from_wit(m, limits) {
                            Ok(mut d) => {
                                // A transform may lower the QoS, never raise it: the
                                // publisher's flow has already been chosen.
                                d.qos = d.qos.min(drafts[i].qos);
                                drafts[i] = d;
                            }
                            Err(_) => {
                                p.bad_answer(
                                    "transform",
                                    "replacement with an invalid topic name (or one over the topic limits)",
                                );
                            }
                        },
                    }
                }
            }
            Err(_) => {
                if p.sidecar.on_failure.transform == PassFailure::Drop {
                    for &i in &idx {
                        fates[i] = Fate::Drop;
                    }
                }
            }
        }
    }
}

fn deliver_chain(
    chain: &Chain,
    subscriber: &ClientInfo,
    batch: &mut VecDeque<Delivery>,
    limits: &crate::config::TopicLimits,
) -> Vec<Delivery> {
    // (delivery, still to be sent); the ones that passed the chain before are left alone.
    let fresh: Vec<bool> = batch.iter().map(|d| !d.hooked).collect();
    let mut items: Vec<(Delivery, bool)> = batch.drain(..).map(|d| (d, true)).collect();
    let mut wit_client = None;
    for p in &chain.plugins {
        if !p.hooks.has(Hooks::DELIVER) {
            continue;
        }
        let idx: Vec<usize> = (0..items.len())
            .filter(|&i| fresh[i] && items[i].1 && p.sidecar.selects(items[i].0.msg.topic.as_str()))
            .collect();
        if idx.is_empty() {
            continue;
        }
        let client = wit_client.get_or_insert_with(|| client_to_wit(subscriber));
        let msgs: Vec<types::Message> = idx
            .iter()
            .map(|&i| {
                let d = &items[i].0;
                message_to_wit(&d.msg, d.qos, d.retain)
            })
            .collect();
        let _span = tracing::debug_span!("plugin", plugin = %p.name, hook = "deliver").entered();
        let r = p
            .call("deliver", |s| match &s.guests.deliver {
                Some(g) => g.call_deliver(&mut s.store, client, &msgs),
                None => Ok(vec![types::Outcome::Keep; msgs.len()]),
            })
            .and_then(|o| {
                if o.len() == msgs.len() {
                    Ok(o)
                } else {
                    Err(p.arity("deliver", msgs.len(), o.len()))
                }
            });
        match r {
            Ok(outcomes) => {
                for (&i, o) in idx.iter().zip(outcomes) {
                    match o {
                        types::Outcome::Keep => {}
                        types::Outcome::Drop | types::Outcome::Reject(_) => items[i].1 = false,
                        types::Outcome::Replace(m) => match Draft::from_wit(m, limits) {
                            Ok(new) => {
                                let d = &mut items[i].0;
                                let old = &d.msg;
                                d.qos = d.qos.min(new.qos);
                                d.retain = new.retain;
                                d.msg = Arc::new(Message {
                                    topic: new.topic,
                                    payload: new.payload,
                                    qos: old.qos,
                                    retain: old.retain,
                                    properties: new.properties,
                                    expires_at: old.expires_at,
                                    origin: old.origin,
                                });
                            }
                            Err(_) => {
                                p.bad_answer("deliver", "replacement with an invalid topic name");
                            }
                        },
                    }
                }
            }
            Err(_) => {
                if p.sidecar.on_failure.deliver == PassFailure::Drop {
                    for &i in &idx {
                        items[i].1 = false;
                    }
                }
            }
        }
    }
    let mut dropped = Vec::new();
    for (mut d, keep) in items {
        d.hooked = true;
        if keep {
            batch.push_back(d);
        } else {
            dropped.push(d);
        }
    }
    dropped
}

/// What a `reject(code)` outcome means for an MQTT 5 publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Answer a QoS 1/2 message with this PUBACK/PUBREC code; drop a QoS 0 one.
    Ack(u8),
    /// Disconnect the publisher with this DISCONNECT reason code.
    Disconnect(u8),
}

impl Rejection {
    /// Classifies a plugin's reason code (MQTT 5 §3.4.2.1 and §3.14.2.1); a code valid in
    /// neither packet is 0x87 in the acknowledgement.
    pub fn of(code: u8) -> Rejection {
        const ACK: &[u8] = &[0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
        const DISCONNECT: &[u8] = &[
            0x81, 0x82, 0x89, 0x8D, 0x8E, 0x8F, 0x93, 0x94, 0x95, 0x96, 0x98, 0x9A, 0x9B, 0x9C,
            0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
        ];
        if ACK.contains(&code) {
            Rejection::Ack(code)
        } else if DISCONNECT.contains(&code) {
            Rejection::Disconnect(code)
        } else {
            Rejection::Ack(super::NOT_AUTHORIZED)
        }
    }
}
