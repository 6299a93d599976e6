//! The message hooks: `transform` (per publisher, on what one read decoded) and `deliver`
//! (per subscriber, on what one write carries), and the conversions between the broker's
//! messages and the contract's.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::bindings::sandpiper::plugin::types;
use super::plugin::CallError;
use super::sidecar::PassFailure;
use super::{Chain, ClientInfo, Hooks, Plugin, Plugins, qos_from_wit, qos_to_wit};
use crate::codec::{MessageProperties, QoS, Rejection, TopicName, UserProperties};
use crate::message::{Delivery, Draft, Message};

/// What the transform chain decided for one draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Route it (possibly changed).
    Route,
    /// Accepted and dropped.
    Drop,
    /// Refused (see `outcome.reject` in `wit/types.wit`).
    Reject(Rejection),
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
        username: c.username().map(str::to_owned),
        listener: c.listener().to_string(),
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

/// The `transform` hook's pass: each plugin sees the previous one's output; a message
/// dropped or refused goes no further. The plugin that published a message skips it.
struct TransformPass<'a> {
    publisher: &'a ClientInfo,
    client: Option<types::Client>,
    drafts: &'a mut [Draft],
    fates: &'a mut [Fate],
    skip: Option<&'a str>,
    limits: &'a crate::config::TopicLimits,
}

impl super::pass::Pass for TransformPass<'_> {
    const HOOK: u32 = Hooks::TRANSFORM;
    const NAME: &'static str = "transform";
    type Answer = types::Outcome;

    fn takes(&self, p: &Plugin) -> bool {
        self.skip != Some(&*p.name)
    }

    fn wants(&self, p: &Plugin, i: usize) -> bool {
        self.fates[i] == Fate::Route && p.sidecar.selects(self.drafts[i].topic.as_str())
    }

    fn call(&mut self, p: &Plugin, idx: &[usize]) -> Result<Vec<types::Outcome>, CallError> {
        let publisher = self.publisher;
        let client = self.client.get_or_insert_with(|| client_to_wit(publisher));
        let batch: Vec<types::Message> = idx.iter().map(|&i| self.drafts[i].to_wit()).collect();
        p.call("transform", |s| match &s.guests.transform {
            Some(g) => g.call_transform(&mut s.store, client, &batch),
            None => Ok(vec![types::Outcome::Keep; batch.len()]),
        })
    }

    fn apply(&mut self, p: &Plugin, i: usize, o: types::Outcome) {
        match o {
            types::Outcome::Keep => {}
            types::Outcome::Drop => self.fates[i] = Fate::Drop,
            types::Outcome::Reject(code) => self.fates[i] = Fate::Reject(Rejection::of(code)),
            types::Outcome::Replace(m) => match Draft::from_wit(m, self.limits) {
                Ok(mut d) => {
                    // A transform may lower the QoS, never raise it: the publisher's flow
                    // has already been chosen.
                    d.qos = d.qos.min(self.drafts[i].qos);
                    self.drafts[i] = d;
                }
                Err(_) => p.bad_answer(
                    "transform",
                    "replacement with an invalid topic name (or one over the topic limits)",
                ),
            },
        }
    }

    fn failed(&mut self, p: &Plugin, idx: &[usize]) {
        if p.sidecar.on_failure.transform == PassFailure::Drop {
            for &i in idx {
                self.fates[i] = Fate::Drop;
            }
        }
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
    let n = drafts.len();
    let mut pass = TransformPass {
        publisher,
        client: None,
        drafts,
        fates,
        skip,
        limits,
    };
    super::pass::run(chain, n, &mut pass);
}

/// The `deliver` hook's pass over one write's deliveries: each plugin sees the previous
/// one's output; a delivery dropped or refused is not sent. Deliveries that passed the
/// chain before (handed back unsent) are left alone.
struct DeliverPass<'a> {
    subscriber: &'a ClientInfo,
    client: Option<types::Client>,
    /// (delivery, still to be sent, not hooked before).
    items: Vec<(Delivery, bool, bool)>,
    limits: &'a crate::config::TopicLimits,
}

impl super::pass::Pass for DeliverPass<'_> {
    const HOOK: u32 = Hooks::DELIVER;
    const NAME: &'static str = "deliver";
    type Answer = types::Outcome;

    fn wants(&self, p: &Plugin, i: usize) -> bool {
        let (d, send, fresh) = &self.items[i];
        *fresh && *send && p.sidecar.selects(d.msg.topic.as_str())
    }

    fn call(&mut self, p: &Plugin, idx: &[usize]) -> Result<Vec<types::Outcome>, CallError> {
        let subscriber = self.subscriber;
        let client = self.client.get_or_insert_with(|| client_to_wit(subscriber));
        let msgs: Vec<types::Message> = (idx.iter())
            .map(|&i| {
                let d = &self.items[i].0;
                message_to_wit(&d.msg, d.qos, d.retain)
            })
            .collect();
        p.call("deliver", |s| match &s.guests.deliver {
            Some(g) => g.call_deliver(&mut s.store, client, &msgs),
            None => Ok(vec![types::Outcome::Keep; msgs.len()]),
        })
    }

    fn apply(&mut self, p: &Plugin, i: usize, o: types::Outcome) {
        match o {
            types::Outcome::Keep => {}
            types::Outcome::Drop | types::Outcome::Reject(_) => self.items[i].1 = false,
            types::Outcome::Replace(m) => match Draft::from_wit(m, self.limits) {
                Ok(new) => {
                    let d = &mut self.items[i].0;
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
                        publisher: old.publisher,
                    });
                }
                Err(_) => p.bad_answer("deliver", "replacement with an invalid topic name"),
            },
        }
    }

    fn failed(&mut self, p: &Plugin, idx: &[usize]) {
        if p.sidecar.on_failure.deliver == PassFailure::Drop {
            for &i in idx {
                self.items[i].1 = false;
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
    let items: Vec<(Delivery, bool, bool)> = batch
        .drain(..)
        .map(|d| {
            let fresh = !d.hooked;
            (d, true, fresh)
        })
        .collect();
    let n = items.len();
    let mut pass = DeliverPass {
        subscriber,
        client: None,
        items,
        limits,
    };
    super::pass::run(chain, n, &mut pass);
    let mut dropped = Vec::new();
    for (mut d, keep, _) in pass.items {
        d.hooked = true;
        if keep {
            batch.push_back(d);
        } else {
            dropped.push(d);
        }
    }
    dropped
}
