//! The one way a message enters the broker: a client's PUBLISH, a will, a plugin's
//! `publish`, an operator's `POST /api/v1/publish`, a message a bridge receives from its
//! remote. Every message takes the same steps:
//!
//! 1. **authorize**: a client's PUBLISH by its connection's gate (decisions cached per
//!    connection, `connection/publish.rs`), a will when its CONNECT is accepted
//!    (`connection/handshake.rs`); a plugin's or an operator's message is not authorized
//!    (plugins are the operator's code; the admin API checks its token; a bridge's
//!    topics are the operator's configuration);
//! 2. **transform**: the `transform` hooks of the chain (a plugin's own hook is skipped for
//!    what it publishes);
//! 3. **route**: the router queues it for every matching session and keeps it if retained;
//! 4. **sinks and outlets**: every sink plugin whose topics select it queues it durably,
//!    and so does every bridge whose outbound topics select it ([`Outlet`]; a bridge
//!    never takes back what it brought in), and every other node of a cluster whose
//!    clients subscribe to it (`cluster`; such a node routes it to its own sessions only,
//!    [`Pipeline::route_from_node`]).
//!
//! A client's messages are transformed in batches (what one read decoded) and acknowledged
//! by the connection once the store tickets of steps 3 and 4 are durable; wills and plugin
//! messages go through [`Pipeline::publish`], which nobody waits on.

use std::sync::Arc;

use crate::codec::TopicFilter;
use crate::message::Delivery;
use crate::message::{ClientKey, Draft, Message, Principal};
use crate::plugins::flow::Fate;
use crate::plugins::{ClientInfo, Hooks, Plugins};
use crate::router::{Routed, Router, Serve};

/// Who a message comes from.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A client's PUBLISH, from its session `session`.
    Client {
        /// The publishing session (No Local).
        session: ClientKey,
        /// The client, as the plugins see it.
        client: &'a ClientInfo,
    },
    /// The will of session `session`, published when its connection ended.
    Will {
        /// The session that set it (No Local).
        session: ClientKey,
        /// The client that set it, as the plugins saw it.
        client: &'a ClientInfo,
    },
    /// A plugin's message (the `publish` host import).
    Plugin {
        /// The plugin's name.
        name: &'a str,
    },
    /// An operator's message (the admin API's `POST /publish`).
    Admin {
        /// The name of the token it came with.
        token: &'a str,
    },
    /// A message a bridge received from its remote broker.
    Bridge {
        /// The bridge's name.
        name: &'a str,
    },
}

impl Origin<'_> {
    /// The session that publishes, for No Local.
    pub fn session(&self) -> Option<ClientKey> {
        match *self {
            Origin::Client { session, .. } | Origin::Will { session, .. } => Some(session),
            Origin::Plugin { .. } | Origin::Admin { .. } | Origin::Bridge { .. } => None,
        }
    }

    /// The client the hooks are told about.
    fn client<'c>(&'c self, nobody: &'c ClientInfo) -> &'c ClientInfo {
        match self {
            Origin::Client { client, .. } | Origin::Will { client, .. } => client,
            Origin::Plugin { .. } | Origin::Admin { .. } | Origin::Bridge { .. } => nobody,
        }
    }

    /// The plugin whose own transform is skipped.
    fn plugin(&self) -> Option<&str> {
        match self {
            Origin::Plugin { name } => Some(name),
            _ => None,
        }
    }
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Client { client, .. } => write!(f, "client {}", client.client_id),
            Origin::Will { client, .. } => write!(f, "will of {}", client.client_id),
            Origin::Plugin { name } => write!(f, "plugin {name}"),
            Origin::Admin { token } => write!(f, "admin API (token {token})"),
            Origin::Bridge { name } => write!(f, "bridge {name}"),
        }
    }
}

/// Where routed messages leave the broker besides its sessions and sink plugins: the
/// bridges and the other nodes of a cluster. Defined here so that the pipeline needs to know
/// nothing of what is behind it.
pub trait Outlet: Send + Sync + std::fmt::Debug {
    /// Queues `msg` where it selects it; `placed` are the shared subscriptions other nodes
    /// serve it to ([`Outlet::place`]).
    fn offer(&self, from: &Origin<'_>, msg: &Arc<Message>, placed: &Placed) -> Offered;
    /// Chooses, before `msg` is routed, which node serves each shared subscription its
    /// topic matches where several nodes have members (the cluster); this node's router
    /// skips those placed elsewhere.
    fn place(&self, msg: &Message) -> Placed {
        let _ = msg;
        Placed::default()
    }
    /// Takes a message of the shared subscription `share` that this node cannot hand to
    /// any member (its member left), for a member elsewhere: what makes it durable there,
    /// or `None` if there is no such member.
    fn take_shared(&self, msg: &Arc<Message>, share: &TopicFilter) -> Option<Offered> {
        let _ = (msg, share);
        None
    }
}

/// The shared subscriptions a message goes to on other nodes of a cluster, each with the
/// node that serves it (`$share/GROUP/FILTER`, node).
#[derive(Debug, Default)]
pub struct Placed(pub Vec<(Arc<str>, Arc<str>)>);

impl Placed {
    /// Whether no shared subscription is served elsewhere.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether another node serves the shared subscription `share`.
    pub fn elsewhere(&self, share: &str) -> bool {
        self.0.iter().any(|(s, _)| **s == *share)
    }
}

/// What an [`Outlet`] did with a message.
#[derive(Debug, Default)]
pub struct Offered {
    /// The store ticket that makes it durable there (the publisher's acknowledgement
    /// waits for it).
    pub ticket: Option<u64>,
    /// The cluster's ticket that makes it durable for other nodes (JetStream's
    /// acknowledgement; the publisher's acknowledgement waits for it too).
    pub replicated: Option<u64>,
    /// A queue of the outlet that is behind: the publisher should wait for room.
    pub congested: Option<Arc<dyn crate::mailbox::Room>>,
    /// The outlet took the message for somewhere (another node, a bridge).
    pub taken: bool,
}

/// Transform, route and sinks, shared by every connection, the session registry (wills)
/// and the plugin host (plugin messages).
#[derive(Debug)]
pub struct Pipeline {
    router: Arc<Router>,
    plugins: Arc<Plugins>,
    /// The bridges and the other nodes of a cluster, once the broker has built them.
    outlets: std::sync::OnceLock<Vec<Arc<dyn Outlet>>>,
    retain_available: bool,
    /// What the hooks see as the client of a plugin's message: the contract's records
    /// have no "no client", so every field is empty.
    nobody: ClientInfo,
}

impl Pipeline {
    /// A pipeline over `router` and `plugins`; `retain_available` as configured.
    pub fn new(router: Arc<Router>, plugins: Arc<Plugins>, retain_available: bool) -> Pipeline {
        Pipeline {
            router,
            plugins,
            outlets: std::sync::OnceLock::new(),
            retain_available,
            nobody: ClientInfo {
                client_id: "".into(),
                principal: Arc::new(Principal {
                    user: None,
                    listener: "".into(),
                }),
                attributes: Box::default(),
            },
        }
    }

    /// Sets where routed messages also go (once).
    pub fn set_outlets(&self, outlets: Vec<Arc<dyn Outlet>>) {
        let _ = self.outlets.set(outlets);
    }

    /// The router behind the pipeline.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Whether a transform hook is loaded (else step 2 is skipped without a call).
    #[inline]
    pub fn transforms(&self) -> bool {
        self.plugins.hooks() & Hooks::TRANSFORM != 0
    }

    /// Step 2 for a batch of drafts from one origin: each fate says whether to route it
    /// (changed or not), drop it or refuse it.
    pub fn transform(&self, from: &Origin<'_>, drafts: &mut [Draft], fates: &mut [Fate]) {
        let client = from.client(&self.nobody);
        (self.plugins).transform(client, drafts, fates, from.plugin());
    }

    /// The broker's own status (`$SYS`): no hooks, retained in memory only, routed.
    pub fn publish_system(&self, msg: &Arc<Message>) {
        if msg.retain {
            self.router.retain_system(msg);
        }
        self.router.publish(msg);
    }

    /// Steps 3 and 4 for an accepted message. The ticket of what it returns covers both:
    /// the publisher is acknowledged once it is durable.
    pub fn route(&self, from: &Origin<'_>, msg: &Arc<Message>) -> Routed {
        let outlets = self.outlets.get().map_or(&[][..], Vec::as_slice);
        let placed = (outlets.iter())
            .map(|o| o.place(msg))
            .find(|p| !p.is_empty())
            .unwrap_or_default();
        let mut routed = match placed.is_empty() {
            true => self.router.route(msg),
            false => (self.router).route_sharing(msg, |g| !placed.elsewhere(g.as_str())),
        };
        let publisher = &from.client(&self.nobody).client_id;
        routed.ticket = routed.ticket.max(self.plugins.sink_offer(publisher, msg));
        let mut taken = false;
        for o in outlets {
            let offered = o.offer(from, msg, &placed);
            routed.ticket = routed.ticket.max(offered.ticket);
            routed.replicated = routed.replicated.max(offered.replicated);
            taken |= offered.taken;
            if routed.congested.is_none() {
                routed.congested = offered.congested;
            }
        }
        if routed.delivered == 0
            && !taken
            && !msg.retain
            && !self.plugins.sink_selects(msg.topic.as_str())
        {
            crate::metrics::inc(crate::metrics::C::DroppedNoSubscriber);
        }
        routed
    }

    /// A message another node of the cluster accepted (and transformed, offered to its
    /// sinks and bridges, and retained if it is): step 3 for this node's sessions only,
    /// and of its shared subscriptions only those in `shares` (the node that accepted it
    /// chose this one to serve them).
    /// A shared subscription whose members here are gone meanwhile goes on to another node
    /// with members, if there is one. So does one whose members here are all offline,
    /// unless the message was `handed_on` already (by a node that had no member, or none
    /// online, or from a member that left): then an offline member here takes it, as one
    /// broker gives a group's message to an offline member when no member is online.
    pub fn route_from_node(
        &self,
        msg: &Arc<Message>,
        shares: &[Arc<str>],
        handed_on: bool,
    ) -> Routed {
        if shares.is_empty() {
            return self.router.publish_sharing(msg, |_| false);
        }
        let served = std::cell::RefCell::new(vec![false; shares.len()]);
        let how = match handed_on {
            true => Serve::Any,
            false => Serve::Online,
        };
        let mut asleep = Vec::new();
        let serve = |g: &TopicFilter| match shares.iter().position(|s| **s == *g.as_str()) {
            Some(i) => {
                if let Some(s) = served.borrow_mut().get_mut(i) {
                    *s = true;
                }
                how
            }
            None => Serve::No,
        };
        let mut routed = self.router.publish_serving(msg, true, serve, &mut asleep);
        let outlets = self.outlets.get().map_or(&[][..], Vec::as_slice);
        let hand_on = |share: &TopicFilter, routed: &mut Routed| {
            let taken = outlets.iter().find_map(|o| o.take_shared(msg, share));
            if let Some(o) = &taken {
                // The pack it came in is acknowledged once the next node's copy is held.
                routed.replicated = routed.replicated.max(o.replicated);
            }
            taken.is_some()
        };
        for (share, served) in shares.iter().zip(served.into_inner()) {
            if served {
                continue;
            }
            let taken = TopicFilter::new(share).is_ok_and(|f| hand_on(&f, &mut routed));
            if !taken {
                crate::metrics::inc(crate::metrics::C::DroppedNoSubscriber);
                tracing::debug!(topic = %msg.topic, share = %share,
                    "message of a shared subscription dropped: no member here or elsewhere");
            }
        }
        for share in asleep {
            if hand_on(&share, &mut routed) {
                continue;
            }
            // No other node has members: an offline member here takes it.
            let only = |g: &TopicFilter| match *g == share {
                true => Serve::Any,
                false => Serve::No,
            };
            let here = self
                .router
                .publish_serving(msg, false, only, &mut Vec::new());
            routed.merge(here);
        }
        routed
    }

    /// Hands a delivery of a shared subscription to another member (MQTT 5 §4.8.2): one
    /// of this node's other than `exclude`, else, for a message whose topic's members are
    /// all elsewhere in a cluster, a member on another node. Gives the delivery back if
    /// there is none.
    pub fn redeliver_shared(&self, d: Delivery, exclude: ClientKey) -> Result<(), Delivery> {
        let d = match self.router.redeliver_shared(d, exclude) {
            Ok(()) => return Ok(()),
            Err(d) => d,
        };
        let Some(share) = d.shared.as_ref() else {
            return Err(d);
        };
        let outlets = self.outlets.get().map_or(&[][..], Vec::as_slice);
        match outlets
            .iter()
            .any(|o| o.take_shared(&d.msg, share).is_some())
        {
            true => Ok(()),
            false => Err(d),
        }
    }

    /// Steps 2 to 4 for a message nobody waits on (a will, a plugin's message): `None`
    /// when a transform dropped or refused it, or it is retained and retained messages
    /// are off.
    pub fn publish(&self, from: &Origin<'_>, draft: Draft) -> Option<Routed> {
        let mut drafts = [draft];
        if self.transforms() {
            let mut fates = [Fate::Route];
            self.transform(from, &mut drafts, &mut fates);
            if fates[0] != Fate::Route {
                tracing::debug!(origin = %from, topic = %drafts[0].topic, fate = ?fates[0],
                    "message not routed: a transform plugin dropped or refused it");
                return None;
            }
        }
        let [draft] = drafts;
        if draft.topic.is_sys() {
            tracing::info!(origin = %from, topic = %draft.topic,
                "message dropped: only the broker publishes under $SYS");
            return None;
        }
        if draft.retain && !self.retain_available {
            tracing::debug!(origin = %from, topic = %draft.topic,
                "retained message dropped: retain_available is off");
            return None;
        }
        let msg = draft.into_message(from.session());
        let routed = self.route(from, &msg);
        if routed.not_retained {
            tracing::warn!(origin = %from, topic = %msg.topic,
                "retained store full: message routed, not retained");
        }
        Some(routed)
    }
}
