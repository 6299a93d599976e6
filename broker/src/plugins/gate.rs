//! The per-connection side of authorization: who the client is (as authentication left
//! it) and the decisions already made for it. Decisions are cached per action, topic, QoS
//! and retain flag; the cache lives and dies with the connection and is cleared whenever
//! the plugin chain changes (its generation moves).

use std::collections::HashMap;
use std::sync::Arc;

use super::{Action, ClientInfo, Hooks, Join, Plugins, Request, Verdict};
use crate::codec::QoS;
use crate::codec::TopicFilter;

/// Most cached decisions per connection; beyond, the cache starts over (a client that
/// publishes to ever new topics cannot grow it without bound).
const MAX_CACHED: usize = 4096;

/// Cached verdicts of one topic, one slot per action × QoS × retain flag: a hit is one
/// hash of the topic, without allocating.
type Slots = [Option<Verdict>; 24];

fn slot(action: Action, qos: QoS, retain: bool) -> usize {
    let a = match action {
        Action::Publish => 0,
        Action::Subscribe => 1,
        Action::Will => 2,
        Action::Retained => 3,
    };
    (a * 3 + qos as usize) * 2 + usize::from(retain)
}

/// One connection's authorization state.
pub struct Gate {
    plugins: Arc<Plugins>,
    client: ClientInfo,
    /// Made on the first verdict to keep (boxed: most connections of a broker without
    /// authorization plugins never have one, and every byte here is kept by every idle
    /// client).
    cache: Option<Box<Cache>>,
    /// The chain generation the session's subscriptions were last authorized with.
    subscriptions_generation: u64,
}

/// A gate while its connection is parked: what [`Gate`] keeps but the client id (the
/// session has it), the plugins (the broker has them) and the attributes (the parked
/// connection keeps them with its rarely used state, most clients have none).
pub struct RestingGate {
    principal: Arc<crate::message::Principal>,
    cache: Option<Box<Cache>>,
    subscriptions_generation: u64,
}

impl RestingGate {
    /// The gate again, for the client `client_id` with its `attributes`, over `plugins`
    /// (the ones it was made with).
    pub fn wake(
        self,
        plugins: Arc<Plugins>,
        client_id: crate::message::ClientId,
        attributes: Box<[(String, String)]>,
    ) -> Gate {
        Gate {
            plugins,
            client: ClientInfo {
                client_id,
                principal: self.principal,
                attributes,
            },
            cache: self.cache,
            subscriptions_generation: self.subscriptions_generation,
        }
    }
}

/// The verdicts a connection keeps, made by one generation of the chain.
#[derive(Default)]
struct Cache {
    verdicts: HashMap<Box<str>, Slots>,
    /// Verdicts cached (over every topic).
    cached: usize,
    generation: u64,
}

impl Gate {
    /// A gate for an authenticated client.
    pub fn new(plugins: Arc<Plugins>, client: ClientInfo) -> Gate {
        let generation = plugins.generation();
        Gate {
            plugins,
            client,
            cache: None,
            subscriptions_generation: generation,
        }
    }

    /// Whether the plugin chain changed since the subscriptions were last authorized: one
    /// relaxed atomic load.
    #[inline]
    pub fn subscriptions_outdated(&self) -> bool {
        self.plugins.generation() != self.subscriptions_generation
    }

    /// Notes that the subscriptions are being authorized with the chain of now.
    pub fn subscriptions_authorized(&mut self) {
        self.subscriptions_generation = self.plugins.generation();
    }

    /// Who the client is, as authentication left it.
    pub fn client(&self) -> &ClientInfo {
        &self.client
    }

    /// The gate as a parked connection keeps it, and the client's attributes.
    pub fn rest(self) -> (RestingGate, Box<[(String, String)]>) {
        let gate = RestingGate {
            principal: self.client.principal,
            cache: self.cache,
            subscriptions_generation: self.subscriptions_generation,
        };
        (gate, self.client.attributes)
    }

    /// Whether any plugin authorizes: one relaxed atomic load. When false, everything is
    /// allowed and [`Gate::check`] need not be called.
    #[inline]
    pub fn active(&self) -> bool {
        self.plugins.hooks() & Hooks::AUTHORIZE != 0
    }

    /// Whether any plugin authorizes subscriptions or joins to shared ones: one relaxed
    /// atomic load. When false, [`Gate::check_subscriptions`] need not be called.
    #[inline]
    pub fn checks_subscriptions(&self) -> bool {
        self.plugins.hooks() & (Hooks::AUTHORIZE | Hooks::SHARE) != 0
    }

    /// The verdict for one request (cached).
    pub fn check(&mut self, action: Action, topic: &str, qos: QoS, retain: bool) -> Verdict {
        self.refresh();
        if let Some(v) = (self.cache.as_ref())
            .and_then(|c| c.verdicts.get(topic))
            .and_then(|s| s[slot(action, qos, retain)])
        {
            return v;
        }
        let req = Request {
            action,
            topic,
            qos,
            retain,
        };
        self.check_many(std::slice::from_ref(&req))
            .first()
            .copied()
            .unwrap_or(Verdict::Deny(crate::codec::ReasonCode::NotAuthorized))
    }

    /// Verdicts for a batch of requests; only the ones not cached go to the plugins, in
    /// one call per plugin.
    pub fn check_many(&mut self, requests: &[Request<'_>]) -> Vec<Verdict> {
        let generation = self.refresh();
        let mut out: Vec<Option<Verdict>> = requests
            .iter()
            .map(|r| {
                let s = self.cache.as_ref()?.verdicts.get(r.topic)?;
                s[slot(r.action, r.qos, r.retain)]
            })
            .collect();
        let missing: Vec<usize> = (0..requests.len()).filter(|&i| out[i].is_none()).collect();
        if !missing.is_empty() {
            let ask: Vec<Request<'_>> = missing.iter().map(|&i| requests[i].clone()).collect();
            let verdicts = self.plugins.authorize(&self.client, &ask);
            if (self.cache.as_ref()).is_some_and(|c| c.cached + missing.len() > MAX_CACHED) {
                self.cache = None;
            }
            // A chain swapped during the call may have answered with the old chain: use
            // the answers, but cache them only if the generation did not move.
            let cache = self.plugins.generation() == generation;
            for (&i, v) in missing.iter().zip(verdicts) {
                out[i] = Some(v);
                let r = &requests[i];
                if cache {
                    let c = self.cache.get_or_insert_with(|| {
                        Box::new(Cache {
                            generation,
                            ..Cache::default()
                        })
                    });
                    let slots = match c.verdicts.get_mut(r.topic) {
                        Some(s) => s,
                        None => (c.verdicts).entry(Box::from(r.topic)).or_insert([None; 24]),
                    };
                    let s = &mut slots[slot(r.action, r.qos, r.retain)];
                    if s.is_none() {
                        c.cached += 1;
                    }
                    *s = Some(v);
                }
            }
        }
        out.into_iter()
            .map(|v| v.unwrap_or(Verdict::Deny(crate::codec::ReasonCode::NotAuthorized)))
            .collect()
    }

    /// Verdicts for subscriptions (filter, maximum QoS): `authorize` for each filter
    /// (shared ones without their `$share/{group}/` prefix), then `share` for the shared
    /// ones it allowed. A join's refusal refuses the filter; its QoS cap lowers the
    /// filter's.
    pub fn check_subscriptions(&mut self, filters: &[(&TopicFilter, QoS)]) -> Vec<Verdict> {
        let requests: Vec<Request<'_>> = (filters.iter())
            .map(|(f, qos)| Request {
                action: Action::Subscribe,
                topic: f.filter(),
                qos: *qos,
                retain: false,
            })
            .collect();
        let mut verdicts = self.check_many(&requests);
        let shared: Vec<usize> = (0..filters.len())
            .filter(|&i| filters[i].0.share_group().is_some())
            .filter(|&i| matches!(verdicts[i], Verdict::Allow(_)))
            .collect();
        if shared.is_empty() {
            return verdicts;
        }
        let joins: Vec<Join<'_>> = (shared.iter())
            .map(|&i| Join {
                group: filters[i].0.share_group().unwrap_or_default(),
                filter: filters[i].0.filter(),
                qos: filters[i].1,
            })
            .collect();
        for (&i, joined) in shared.iter().zip(self.plugins.join(&self.client, &joins)) {
            verdicts[i] = match (verdicts[i], joined) {
                (_, Verdict::Deny(code)) => Verdict::Deny(code),
                (Verdict::Allow(Some(a)), Verdict::Allow(Some(b))) => {
                    Verdict::Allow(Some(a.min(b)))
                }
                (Verdict::Allow(a), Verdict::Allow(b)) => Verdict::Allow(a.or(b)),
                (deny, _) => deny,
            };
        }
        verdicts
    }

    /// Drops the cached verdicts if the chain changed since they were made; returns the
    /// generation the cache now stands for (verdicts of another are not added to it).
    fn refresh(&mut self) -> u64 {
        let generation = self.plugins.generation();
        if (self.cache.as_ref()).is_some_and(|c| c.generation != generation) {
            self.cache = None;
        }
        generation
    }
}
