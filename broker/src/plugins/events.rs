//! The `events` hook: notifications of what happens in the broker, queued without blocking
//! the connection that caused them and handed to the plugins in batches by a thread of
//! their own. A full queue drops the event and counts it.

use std::net::SocketAddr;
use std::sync::Weak;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TrySendError};
use std::time::Duration;

use super::bindings::hooks::events as ev;
use super::bindings::sandpiper::plugin::types;
use super::flow::client_to_wit;
use super::{ClientInfo, Hooks, Plugins, qos_to_wit};
use crate::codec::{ProtocolVersion, QoS};
use crate::metrics::{self, C};

/// Events waiting for the plugins; beyond, new events are dropped.
pub const QUEUE: usize = 16_384;
/// Most events handed to a plugin in one call.
const BATCH: usize = 512;

/// Why a message was dropped for a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The subscriber's queue was full.
    QueueFull,
    /// Expired before delivery.
    Expired,
    /// Larger than the subscriber's Maximum Packet Size.
    TooLarge,
    /// A transform or deliver plugin dropped it.
    Plugin,
}

/// One event.
#[derive(Debug, Clone)]
pub enum Event {
    /// A client connected.
    Connected {
        /// The client.
        client: ClientInfo,
        /// Peer address.
        peer: SocketAddr,
        /// Protocol version.
        protocol: ProtocolVersion,
        /// Whether a session was resumed.
        session_present: bool,
    },
    /// A client's connection ended.
    Disconnected {
        /// The client.
        client: ClientInfo,
        /// Reason code of the DISCONNECT sent or received; none when the connection was lost.
        reason: Option<u8>,
    },
    /// A subscription was made.
    Subscribed {
        /// The client.
        client: ClientInfo,
        /// The filter, with any `$share/{group}/` prefix.
        filter: String,
        /// Granted QoS.
        qos: QoS,
    },
    /// A subscription was removed.
    Unsubscribed {
        /// The client.
        client: ClientInfo,
        /// The filter.
        filter: String,
    },
    /// A session expired.
    SessionExpired(String),
    /// A message was dropped.
    MessageDropped {
        /// Subscriber's client id (empty when dropped for every subscriber).
        client_id: String,
        /// Topic.
        topic: String,
        /// Why.
        reason: DropReason,
    },
}

impl Plugins {
    /// Whether any plugin observes events: one relaxed load, to check before building one.
    #[inline]
    pub fn wants_events(&self) -> bool {
        self.hooks() & Hooks::EVENTS != 0
    }

    /// Queues an event for the plugins that observe events (never blocks).
    pub fn emit(&self, e: Event) {
        if !self.wants_events() {
            return;
        }
        if let Err(TrySendError::Full(_)) = self.events_tx.try_send(e) {
            metrics::inc(C::PluginEventsDropped);
        }
    }
}

fn to_wit(e: &Event) -> ev::Event {
    let sub = |client: &ClientInfo, filter: &str, qos: QoS| ev::Subscription {
        client: client_to_wit(client),
        filter: filter.to_owned(),
        qos: qos_to_wit(qos),
    };
    match e {
        Event::Connected {
            client,
            peer,
            protocol,
            session_present,
        } => ev::Event::Connected(ev::Connected {
            client: client_to_wit(client),
            peer: peer.to_string(),
            protocol: match protocol {
                ProtocolVersion::V3_1 => types::ProtocolVersion::V31,
                ProtocolVersion::V3_1_1 => types::ProtocolVersion::V311,
                ProtocolVersion::V5 => types::ProtocolVersion::V5,
            },
            session_present: *session_present,
        }),
        Event::Disconnected { client, reason } => ev::Event::Disconnected(ev::Disconnected {
            client: client_to_wit(client),
            reason: *reason,
        }),
        Event::Subscribed {
            client,
            filter,
            qos,
        } => ev::Event::Subscribed(sub(client, filter, *qos)),
        Event::Unsubscribed { client, filter } => {
            ev::Event::Unsubscribed(sub(client, filter, QoS::AtMostOnce))
        }
        Event::SessionExpired(id) => ev::Event::SessionExpired(id.clone()),
        Event::MessageDropped {
            client_id,
            topic,
            reason,
        } => ev::Event::MessageDropped(ev::MessageDropped {
            client_id: client_id.clone(),
            topic: topic.clone(),
            reason: match reason {
                DropReason::QueueFull => ev::DropReason::QueueFull,
                DropReason::Expired => ev::DropReason::Expired,
                DropReason::TooLarge => ev::DropReason::TooLarge,
                DropReason::Plugin => ev::DropReason::Plugin,
            },
        }),
    }
}

/// Hands queued events to the plugins until shutdown or until the host is dropped.
pub(super) fn spawn(
    plugins: Weak<Plugins>,
    rx: Receiver<Event>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let r = std::thread::Builder::new()
        .name("plugin-events".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            while !shutdown.is_cancelled() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(e) => batch.push(e),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                let Some(p) = plugins.upgrade() else { return };
                deliver(&p, &batch);
                batch.clear();
            }
        });
    if let Err(e) = r {
        tracing::error!(error = %e, "plugin events thread failed to start: no events");
    }
}

fn deliver(plugins: &Plugins, batch: &[Event]) {
    let chain = plugins.chain();
    let mut wit: Option<Vec<ev::Event>> = None;
    for p in &chain.plugins {
        if !p.hooks.has(Hooks::EVENTS) {
            continue;
        }
        let events = wit.get_or_insert_with(|| batch.iter().map(to_wit).collect());
        let _ = p.call("events", |s| match &s.guests.events {
            Some(g) => g.call_on_events(&mut s.store, events),
            None => Ok(()),
        });
    }
}
