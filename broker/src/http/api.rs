//! The admin API under `/api/v1` (docs/admin-api.md): bearer tokens checked against the
//! hashes of `[[http.token]]`, then JSON reads of the broker's state (clients, sessions,
//! subscriptions, retained messages, plugins) and the changes an operator makes (kick a
//! client, discard a session, clear a retained message, publish). Every changing request
//! is logged with its token's name. Bad input is a 4xx with `{"error": ...}`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::{Bytes, Incoming};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

use super::{Answer, reply};
use crate::broker::Broker;
use crate::codec::{
    MessageProperties, QoS, SubscriptionOptions, TopicFilter, TopicName, UserProperties,
};
use crate::config::{HttpConfig, Role};
use crate::message::{ClientId, Draft, Message};
use crate::metrics::{self, C};
use crate::passwd::Phc;
use crate::pipeline::Origin;
use crate::plugins::{Control, ControlError, PluginState};

/// Largest request body.
const MAX_BODY: usize = 1 << 20;
/// Page size unless `limit` says otherwise, and its maximum.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Verified tokens remembered at most (by SHA-256); beyond, the memory starts over.
const KNOWN_TOKENS: usize = 256;

/// One configured token: its name, role and hash.
type Token = (String, Role, Phc);

/// The configured tokens, parsed again when a reload changed the configuration.
pub(super) struct Tokens {
    /// (configuration generation, its tokens).
    parsed: RwLock<(u64, Arc<Vec<Token>>)>,
    /// SHA-256 of a token verified before → its index (cleared with every new list).
    known: Mutex<HashMap<[u8; 32], usize>>,
}

fn parse_tokens(cfg: &HttpConfig) -> Vec<Token> {
    (cfg.token.iter())
        .filter_map(|t| Some((t.name.clone(), t.role, Phc::parse(&t.hash)?)))
        .collect()
}

impl Tokens {
    pub(super) fn new(broker: &Broker) -> Tokens {
        Tokens {
            parsed: RwLock::new((
                broker.config_generation(),
                Arc::new(parse_tokens(&broker.current().http)),
            )),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The tokens of the configuration in force.
    fn list(&self, broker: &Broker) -> Arc<Vec<Token>> {
        let generation = broker.config_generation();
        {
            let p = self.parsed.read().unwrap_or_else(|e| e.into_inner());
            if p.0 == generation {
                return p.1.clone();
            }
        }
        let list = Arc::new(parse_tokens(&broker.current().http));
        *self.parsed.write().unwrap_or_else(|e| e.into_inner()) = (generation, list.clone());
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clear();
        list
    }

    /// The name and role of the token `headers` carry, if it is one of ours.
    pub(super) fn check(&self, broker: &Broker, headers: &HeaderMap) -> Option<(String, Role)> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = token.trim().as_bytes();
        let list = self.list(broker);
        let digest: [u8; 32] = Sha256::digest(token).into();
        let known = (self.known.lock().unwrap_or_else(|p| p.into_inner()))
            .get(&digest)
            .copied();
        let i = match known {
            Some(i) => i,
            None => {
                let i = (list.iter()).position(|(_, _, phc)| phc.verify(token))?;
                let mut m = self.known.lock().unwrap_or_else(|p| p.into_inner());
                if m.len() >= KNOWN_TOKENS {
                    m.clear();
                }
                m.insert(digest, i);
                i
            }
        };
        list.get(i).map(|(n, r, _)| (n.clone(), *r))
    }
}

fn json_reply(status: StatusCode, v: &Value) -> Answer {
    let mut body = v.to_string();
    body.push('\n');
    reply(status, "application/json", body)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Answer {
    json_reply(status, &json!({ "error": msg.into() }))
}

fn not_found(what: &str) -> Answer {
    error(StatusCode::NOT_FOUND, format!("no such {what}"))
}

/// Answers a request under `/api/v1`.
pub(super) async fn answer(
    broker: &Arc<Broker>,
    tokens: &Tokens,
    req: Request<Incoming>,
) -> Answer {
    let Some((name, role)) = tokens.check(broker, req.headers()) else {
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is needed");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    };
    let method = req.method().clone();
    let changing = method != Method::GET && method != Method::HEAD;
    if changing && role == Role::Read {
        return error(StatusCode::FORBIDDEN, "this token may only read");
    }
    let path = req.uri().path().to_owned();
    let r = route(broker, &name, req).await;
    if changing {
        tracing::info!(token = %name, method = %method, path = %path, status = r.status().as_u16(), "admin request");
    }
    r
}

async fn route(broker: &Arc<Broker>, token: &str, req: Request<Incoming>) -> Answer {
    let method = req.method().clone();
    let query = Query::parse(req.uri().query());
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/api/v1").unwrap_or("");
    // The retained message's topic is the rest of the path, slashes included.
    if let Some(topic) = rest.strip_prefix("/retained/") {
        let Some(topic) = percent_decode(topic) else {
            return error(
                StatusCode::BAD_REQUEST,
                "the topic is not URL-encoded UTF-8",
            );
        };
        return match method {
            Method::GET | Method::HEAD => retained_one(broker, &topic),
            Method::DELETE => retained_clear(broker, &topic),
            _ => method_not_allowed(),
        };
    }
    let mut segs = Vec::new();
    for s in rest.split('/').skip(1) {
        match percent_decode(s) {
            Some(s) => segs.push(s),
            None => return error(StatusCode::BAD_REQUEST, "the path is not URL-encoded UTF-8"),
        }
    }
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get = method == Method::GET || method == Method::HEAD;
    match (segs.as_slice(), get, &method) {
        (["overview"], true, _) => overview(broker),
        (["clients"], true, _) => clients(broker, &query),
        (["clients", id], true, _) => client(broker, id).await,
        (["clients", id], _, &Method::DELETE) => {
            if broker.sessions.kick(&ClientId::new(id)) {
                json_reply(StatusCode::OK, &json!({ "kicked": id }))
            } else {
                not_found("client")
            }
        }
        (["sessions"], true, _) => sessions(broker, &query),
        (["sessions", id], _, &Method::DELETE) => {
            if broker.sessions.discard(&ClientId::new(id)).await {
                json_reply(StatusCode::OK, &json!({ "removed": id }))
            } else {
                not_found("session")
            }
        }
        (["subscriptions"], true, _) => subscriptions(broker, &query).await,
        (["retained"], true, _) => retained(broker, &query),
        (["publish"], _, &Method::POST) => match body(req).await {
            Ok(b) => publish(broker, token, &b),
            Err(r) => r,
        },
        (["plugins"], true, _) => plugins(broker).await,
        (["config", "reload"], _, &Method::POST) => config_reload(broker).await,
        (["plugins", name, what], _, &Method::POST) => plugin_control(broker, name, what).await,
        (
            [
                "overview" | "clients" | "sessions" | "subscriptions" | "retained" | "publish"
                | "plugins",
            ],
            ..,
        )
        | (["clients" | "sessions", _], ..) => method_not_allowed(),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn method_not_allowed() -> Answer {
    error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
}

/// The request body, at most [`MAX_BODY`] bytes.
async fn body(req: Request<Incoming>) -> Result<Bytes, Answer> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {MAX_BODY} bytes"),
        )),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, format!("body: {e}"))),
    }
}

/// A query string's parameters (the last of a repeated name wins).
struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let mut m = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let plus = |s: &str| s.replace('+', " ");
            if let (Some(k), Some(v)) = (percent_decode(&plus(k)), percent_decode(&plus(v))) {
                m.insert(k, v);
            }
        }
        Query(m)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn limit(&self) -> usize {
        (self.get("limit").and_then(|l| l.parse().ok()))
            .unwrap_or(DEFAULT_LIMIT)
            .clamp(1, MAX_LIMIT)
    }
}

/// `%XX` decoding to UTF-8; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One page of `items` (sorted by key) after `after`: the items and the key to ask from
/// next (`None` on the last page).
fn page<T>(mut items: Vec<(String, T)>, q: &Query) -> (Vec<T>, Option<String>) {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let start = match q.get("after") {
        Some(after) => items.partition_point(|(k, _)| k.as_str() <= after),
        None => 0,
    };
    let limit = q.limit();
    let more = items.len() > start + limit;
    let mut page: Vec<(String, T)> = items.into_iter().skip(start).take(limit).collect();
    let next = if more {
        page.last().map(|(k, _)| k.clone())
    } else {
        None
    };
    (page.drain(..).map(|(_, v)| v).collect(), next)
}

fn overview(broker: &Broker) -> Answer {
    let (online, offline) = broker.sessions.counts();
    let (retained_messages, retained_bytes) = broker.router.retained_size();
    let (subscriptions, _) = broker.router.subscription_counts();
    let sum = |cs: [C; 3]| cs.iter().map(|c| metrics::get(*c)).sum::<u64>();
    let dropped = [
        C::DroppedQueueFull,
        C::DroppedExpired,
        C::DroppedTooLarge,
        C::DroppedPlugin,
        C::DroppedNoSubscriber,
    ];
    json_reply(
        StatusCode::OK,
        &json!({
            "version": env!("CARGO_PKG_VERSION"),
            "contract": crate::plugins::CONTRACT_VERSION,
            "uptime_seconds": metrics::uptime().as_secs(),
            "connections": metrics::connected().0,
            "sessions": { "online": online, "offline": offline },
            "subscriptions": subscriptions,
            "retained": { "messages": retained_messages, "bytes": retained_bytes },
            "messages": {
                "received": sum([C::ReceivedQos0, C::ReceivedQos1, C::ReceivedQos2]),
                "sent": sum([C::SentQos0, C::SentQos1, C::SentQos2]),
                "dropped": dropped.iter().map(|c| metrics::get(*c)).sum::<u64>(),
            },
            "bytes": {
                "received": sum([C::ReceivedBytesQos0, C::ReceivedBytesQos1, C::ReceivedBytesQos2]),
                "sent": sum([C::SentBytesQos0, C::SentBytesQos1, C::SentBytesQos2]),
            },
            "store": {
                "failing": broker.store.is_failing(),
                "committed": *broker.store.committed().borrow(),
            },
        }),
    )
}

fn client_json(c: &crate::session::ClientView) -> Map<String, Value> {
    let v = json!({
        "client_id": c.client_id.as_str(),
        "user": c.principal.user.as_deref(),
        "listener": &*c.principal.listener,
        "peer": c.presence.peer.to_string(),
        "protocol": metrics::protocol_label(c.presence.protocol),
        "keep_alive": c.presence.keep_alive,
        "connected_at": c.presence.since_ms,
        "session_expiry": c.expiry,
        "queued": c.queued,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn clients(broker: &Broker, q: &Query) -> Answer {
    let all = broker.sessions.clients();
    let keep = |c: &crate::session::ClientView| {
        q.get("prefix")
            .is_none_or(|p| c.client_id.as_str().starts_with(p))
            && q.get("user")
                .is_none_or(|u| c.principal.user.as_deref() == Some(u))
            && q.get("listener")
                .is_none_or(|l| &*c.principal.listener == l)
            && q.get("protocol").is_none_or(|v| {
                let label = metrics::protocol_label(c.presence.protocol);
                label == v || (v == "5" && label == "5.0")
            })
    };
    let items = (all.iter().filter(|c| keep(c)))
        .map(|c| {
            (
                c.client_id.as_str().to_owned(),
                Value::Object(client_json(c)),
            )
        })
        .collect();
    let (list, next) = page(items, q);
    json_reply(StatusCode::OK, &json!({ "clients": list, "next": next }))
}

fn subscription_json(
    filter: &TopicFilter,
    o: &SubscriptionOptions,
    id: Option<std::num::NonZeroU32>,
) -> Value {
    json!({
        "filter": filter.as_str(),
        "qos": o.qos as u8,
        "no_local": o.no_local,
        "retain_as_published": o.retain_as_published,
        "retain_handling": o.retain_handling as u8,
        "id": id.map(|i| i.get()),
    })
}

async fn client(broker: &Broker, id: &str) -> Answer {
    let id = ClientId::new(id);
    let Some(view) = (broker.sessions.clients().into_iter()).find(|c| c.client_id == id) else {
        return not_found("client");
    };
    let mut m = client_json(&view);
    let Some(inspection) = broker.sessions.inspect(&id).await else {
        // It went while we asked.
        return not_found("client");
    };
    let mut subs = inspection.subscriptions;
    subs.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    let subs: Vec<Value> = (subs.iter())
        .map(|(f, o, i)| subscription_json(f, o, *i))
        .collect();
    m.insert("subscriptions".into(), Value::Array(subs));
    m.insert("inflight".into(), inspection.inflight.into());
    json_reply(StatusCode::OK, &Value::Object(m))
}

fn sessions(broker: &Broker, q: &Query) -> Answer {
    let items = (broker.sessions.sessions().into_iter())
        .filter(|s| {
            q.get("prefix")
                .is_none_or(|p| s.client_id.as_str().starts_with(p))
        })
        .map(|s| {
            let p = s.principal.as_ref();
            let v = json!({
                "client_id": s.client_id.as_str(),
                "online": s.online,
                "expiry": s.expiry,
                "user": p.and_then(|p| p.user.as_deref()),
                "listener": p.map(|p| &*p.listener),
                "subscriptions": s.subscriptions.as_ref().map(Vec::len),
                "queued": s.queued,
            });
            (s.client_id.as_str().to_owned(), v)
        })
        .collect();
    let (list, next) = page(items, q);
    json_reply(StatusCode::OK, &json!({ "sessions": list, "next": next }))
}

async fn subscriptions(broker: &Broker, q: &Query) -> Answer {
    let mut items = Vec::new();
    let mut add = |client_id: &str, f: &TopicFilter, o: &SubscriptionOptions, id| {
        if q.get("filter").is_some_and(|want| want != f.as_str()) {
            return;
        }
        let mut v = subscription_json(f, o, id);
        if let Value::Object(m) = &mut v {
            m.insert("client_id".into(), client_id.into());
        }
        items.push((format!("{client_id}\u{0}{}", f.as_str()), v));
    };
    for s in broker.sessions.sessions() {
        if q.get("client").is_some_and(|c| c != s.client_id.as_str()) {
            continue;
        }
        match &s.subscriptions {
            Some(subs) => {
                for (f, sub) in subs {
                    add(s.client_id.as_str(), f, &sub.options, sub.id);
                }
            }
            None => {
                if let Some(i) = broker.sessions.inspect(&s.client_id).await {
                    for (f, o, id) in &i.subscriptions {
                        add(s.client_id.as_str(), f, o, *id);
                    }
                }
            }
        }
    }
    let (list, next) = page(items, q);
    json_reply(
        StatusCode::OK,
        &json!({ "subscriptions": list, "next": next }),
    )
}

fn properties_json(p: &MessageProperties, m: &Message, now: Instant) -> Value {
    let mut o = Map::new();
    if let Some(v) = p.payload_format_indicator {
        o.insert("payload_format_indicator".into(), u8::from(v).into());
    }
    if let Some(v) = m.remaining_expiry(now) {
        o.insert("message_expiry_interval".into(), v.into());
    }
    if let Some(v) = &p.content_type {
        o.insert("content_type".into(), (**v).into());
    }
    if let Some(v) = &p.response_topic {
        o.insert("response_topic".into(), v.as_str().into());
    }
    if let Some(v) = &p.correlation_data {
        o.insert("correlation_data_base64".into(), B64.encode(v).into());
    }
    if !p.user_properties.is_empty() {
        let pairs: Vec<Value> = (p.user_properties.as_slice().iter())
            .map(|(k, v)| json!([&**k, &**v]))
            .collect();
        o.insert("user_properties".into(), Value::Array(pairs));
    }
    Value::Object(o)
}

fn message_json(m: &Message, now: Instant) -> Value {
    let text = std::str::from_utf8(&m.payload).ok();
    json!({
        "topic": m.topic.as_str(),
        "qos": m.qos as u8,
        "payload": text,
        "payload_base64": if text.is_none() { Some(B64.encode(&m.payload)) } else { None },
        "size": m.payload.len(),
        "properties": properties_json(&m.properties, m, now),
    })
}

fn retained(broker: &Broker, q: &Query) -> Answer {
    let filter = q.get("filter").unwrap_or("#");
    if TopicFilter::new(filter).is_err() {
        return error(StatusCode::BAD_REQUEST, "`filter` is not a topic filter");
    }
    let now = Instant::now();
    let items = (broker.router.retained_matching(filter, now).iter())
        .filter(|m| !m.topic.is_sys())
        .map(|m| (m.topic.as_str().to_owned(), message_json(m, now)))
        .collect();
    let (list, next) = page(items, q);
    json_reply(StatusCode::OK, &json!({ "retained": list, "next": next }))
}

fn retained_one(broker: &Broker, topic: &str) -> Answer {
    let Ok(t) = TopicName::new(topic) else {
        return error(StatusCode::BAD_REQUEST, "not a topic name");
    };
    let now = Instant::now();
    let found = broker.router.retained_matching(t.as_str(), now);
    match found.iter().find(|m| m.topic == t && !t.is_sys()) {
        Some(m) => json_reply(StatusCode::OK, &message_json(m, now)),
        None => not_found("retained message"),
    }
}

fn retained_clear(broker: &Broker, topic: &str) -> Answer {
    let Ok(t) = TopicName::new(topic) else {
        return error(StatusCode::BAD_REQUEST, "not a topic name");
    };
    if t.is_sys() {
        return error(StatusCode::BAD_REQUEST, "$SYS topics are the broker's own");
    }
    let now = Instant::now();
    if !(broker.router.retained_matching(t.as_str(), now).iter()).any(|m| m.topic == t) {
        return not_found("retained message");
    }
    if broker.store.is_failing() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the store is failing");
    }
    let clear = Draft {
        topic: t.clone(),
        payload: Bytes::new(),
        qos: QoS::AtMostOnce,
        retain: true,
        properties: MessageProperties::default(),
    };
    match broker.router.retain(&clear.into_message(None)) {
        Ok(_) => json_reply(StatusCode::OK, &json!({ "cleared": t.as_str() })),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the retained store refused",
        ),
    }
}

/// The draft a `POST /publish` body describes, or why it does not.
fn draft_of(body: &[u8]) -> Result<Draft, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let o = v.as_object().ok_or("the body is a JSON object")?;
    let topic = o
        .get("topic")
        .and_then(Value::as_str)
        .ok_or("`topic` (text) is needed")?;
    let topic = TopicName::new(topic).map_err(|e| format!("`topic`: {e}"))?;
    let payload = match (o.get("payload"), o.get("payload_base64")) {
        (Some(Value::String(s)), None) => Bytes::from(s.clone().into_bytes()),
        (None, Some(Value::String(s))) => Bytes::from(
            B64.decode(s)
                .map_err(|e| format!("`payload_base64`: {e}"))?,
        ),
        (None, None) => Bytes::new(),
        _ => return Err("one of `payload` (text) or `payload_base64`".into()),
    };
    let qos = match o.get("qos").map(Value::as_u64) {
        None | Some(Some(0)) => QoS::AtMostOnce,
        Some(Some(1)) => QoS::AtLeastOnce,
        Some(Some(2)) => QoS::ExactlyOnce,
        _ => return Err("`qos` is 0, 1 or 2".into()),
    };
    let retain = match o.get("retain") {
        None => false,
        Some(Value::Bool(b)) => *b,
        _ => return Err("`retain` is true or false".into()),
    };
    let mut properties = MessageProperties::default();
    if let Some(p) = o.get("properties") {
        let p = p.as_object().ok_or("`properties` is an object")?;
        for (k, v) in p {
            let text = || v.as_str().ok_or(format!("`{k}` is text"));
            match k.as_str() {
                "payload_format_indicator" => {
                    properties.payload_format_indicator = Some(match v.as_u64() {
                        Some(0) => false,
                        Some(1) => true,
                        _ => return Err("`payload_format_indicator` is 0 or 1".into()),
                    })
                }
                "message_expiry_interval" => {
                    let s = (v.as_u64().and_then(|s| u32::try_from(s).ok()))
                        .filter(|s| *s > 0)
                        .ok_or("`message_expiry_interval` is seconds (1 to 4294967295)")?;
                    properties.message_expiry_interval = Some(s);
                }
                "content_type" => properties.content_type = Some(text()?.into()),
                "response_topic" => {
                    let t =
                        TopicName::new(text()?).map_err(|e| format!("`response_topic`: {e}"))?;
                    properties.response_topic = Some(t);
                }
                "correlation_data_base64" => {
                    let d = B64.decode(text()?).map_err(|e| format!("`{k}`: {e}"))?;
                    properties.correlation_data = Some(Bytes::from(d));
                }
                "user_properties" => {
                    let list = v
                        .as_array()
                        .ok_or("`user_properties` is a list of [name, value]")?;
                    let mut pairs = Vec::with_capacity(list.len());
                    for pair in list {
                        match pair.as_array().map(Vec::as_slice) {
                            Some([Value::String(n), Value::String(v)]) => {
                                pairs.push((n.as_str().into(), v.as_str().into()));
                            }
                            _ => return Err("`user_properties` is a list of [name, value]".into()),
                        }
                    }
                    properties.user_properties = UserProperties::new(pairs);
                }
                other => return Err(format!("unknown property `{other}`")),
            }
        }
    }
    if properties.payload_format_indicator == Some(true) && std::str::from_utf8(&payload).is_err() {
        return Err("the payload is not UTF-8 but `payload_format_indicator` is 1".into());
    }
    Ok(Draft {
        topic,
        payload,
        qos,
        retain,
        properties,
    })
}

fn publish(broker: &Broker, token: &str, body: &[u8]) -> Answer {
    let draft = match draft_of(body) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if draft.topic.is_sys() {
        return error(
            StatusCode::BAD_REQUEST,
            "only the broker publishes under $SYS",
        );
    }
    let m = &broker.config.mqtt;
    if !m.topic_limits().fits(draft.topic.as_str()) {
        return error(
            StatusCode::BAD_REQUEST,
            "topic over max_topic_length or max_topic_levels",
        );
    }
    if draft.retain && !m.retain_available {
        return error(
            StatusCode::BAD_REQUEST,
            "retained messages are off (retain_available)",
        );
    }
    if broker.store.is_failing() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the store is failing");
    }
    let topic = draft.topic.as_str().to_owned();
    match broker.pipeline.publish(&Origin::Admin { token }, draft) {
        Some(r) => json_reply(
            StatusCode::OK,
            &json!({ "published": topic, "delivered": r.delivered, "retained_full": r.not_retained }),
        ),
        None => json_reply(
            StatusCode::OK,
            &json!({ "published": topic, "delivered": 0, "dropped_by_plugin": true }),
        ),
    }
}

async fn config_reload(broker: &Broker) -> Answer {
    match crate::reload::reload(broker).await {
        Ok(r) => json_reply(
            StatusCode::OK,
            &json!({ "applied": r.applied, "not_applied": r.not_applied }),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "configuration not reloaded");
            error(
                StatusCode::BAD_REQUEST,
                format!("configuration not reloaded: {e}"),
            )
        }
    }
}

/// The plugins, loaded or not, as `GET /plugins` lists them.
async fn plugin_list(broker: &Arc<Broker>) -> Vec<Value> {
    let plugins = broker.plugins.clone();
    let states = tokio::task::spawn_blocking(move || plugins.states())
        .await
        .unwrap_or_default();
    let chain = broker.plugins.chain();
    let mut list = Vec::new();
    for p in &chain.plugins {
        let mut calls = Map::new();
        for (hook, h) in p.stats.hooks(p.hooks) {
            let (_, count, sum) = h.duration.snapshot();
            let mean_us = if count > 0 {
                sum / count as f64 * 1e6
            } else {
                0.0
            };
            calls.insert(
                hook.into(),
                json!({ "calls": h.calls.load(Ordering::Relaxed), "mean_us": (mean_us * 10.0).round() / 10.0 }),
            );
        }
        let failures: u64 = p.stats.failures().map(|(_, n)| n).sum();
        let sink = broker.plugins.sink_stats(&p.name).map(|q| {
            let s = &q.stats;
            json!({
                "queued": s.depth.load(Ordering::Relaxed),
                "delivered": s.delivered.load(Ordering::Relaxed),
                "dropped": s.dropped.load(Ordering::Relaxed),
                "retries": s.retried.load(Ordering::Relaxed),
                "oldest_age_seconds": q.oldest_age().as_secs(),
            })
        });
        // The last refusal of newer files, while this version goes on serving.
        let last_error = (states.iter())
            .find(|(n, _, _)| n.as_str() == &*p.name)
            .and_then(|(_, _, e)| e.clone());
        list.push(json!({
            "name": &*p.name,
            "state": "loaded",
            "contract": p.contract,
            "hash": p.version,
            "hooks": p.hooks.names(),
            "priority": p.sidecar.priority,
            "calls": calls,
            "failures": failures,
            "last_error": last_error,
            "sink": sink,
        }));
    }
    for (name, state, error) in states {
        let state = match state {
            PluginState::Loaded => continue,
            PluginState::Failed => "failed",
            PluginState::Disabled => "disabled",
        };
        if chain.plugins.iter().any(|p| *p.name == *name) {
            continue;
        }
        list.push(json!({
            "name": name, "state": state, "contract": null, "hash": null, "hooks": [], "priority": null,
            "calls": {}, "failures": 0, "last_error": error, "sink": null,
        }));
    }
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    list
}

async fn plugins(broker: &Arc<Broker>) -> Answer {
    let list = plugin_list(broker).await;
    json_reply(StatusCode::OK, &json!({ "plugins": list }))
}

async fn plugin_control(broker: &Arc<Broker>, name: &str, what: &str) -> Answer {
    let what = match what {
        "reload" => Control::Reload,
        "disable" => Control::Disable,
        "enable" => Control::Enable,
        _ => return error(StatusCode::NOT_FOUND, "no such endpoint"),
    };
    let plugins = broker.plugins.clone();
    let owned = name.to_owned();
    let done = tokio::task::spawn_blocking(move || plugins.control(&owned, what)).await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(ControlError::Unknown)) => return not_found("plugin"),
        Ok(Err(ControlError::Required)) => {
            return error(
                StatusCode::CONFLICT,
                "a required plugin ([plugins] required) cannot be disabled",
            );
        }
        Ok(Err(ControlError::Refused(e))) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("plugin refused: {e}"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the plugin watcher failed",
            );
        }
    }
    let list = plugin_list(broker).await;
    match list.into_iter().find(|p| p["name"] == name) {
        Some(p) => json_reply(StatusCode::OK, &p),
        None => not_found("plugin"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%G0"), None);
        assert_eq!(percent_decode("%FF"), None);
        assert_eq!(percent_decode("%2"), None);
    }

    #[test]
    fn pages_follow_the_keys() {
        let items = |n: usize| (0..n).map(|i| (format!("k{i:03}"), i)).collect::<Vec<_>>();
        let q = Query::parse(Some("limit=2"));
        assert_eq!(page(items(5), &q), (vec![0, 1], Some("k001".into())));
        let q = Query::parse(Some("limit=2&after=k001"));
        assert_eq!(page(items(5), &q), (vec![2, 3], Some("k003".into())));
        let q = Query::parse(Some("limit=2&after=k003"));
        assert_eq!(page(items(5), &q), (vec![4], None));
        let q = Query::parse(Some("limit=0"));
        assert_eq!(page(items(3), &q).0, vec![0]);
    }

    #[test]
    fn publish_bodies() {
        let d = draft_of(
            br#"{"topic":"a/b","payload":"hi","qos":1,"retain":true,
            "properties":{"content_type":"text/plain","user_properties":[["k","v"]],
            "message_expiry_interval":60,"correlation_data_base64":"AAE="}}"#,
        )
        .unwrap();
        assert_eq!(d.topic.as_str(), "a/b");
        assert_eq!(&d.payload[..], b"hi");
        assert_eq!((d.qos, d.retain), (QoS::AtLeastOnce, true));
        assert_eq!(d.properties.message_expiry_interval, Some(60));
        assert_eq!(
            d.properties.correlation_data.as_deref(),
            Some(&[0u8, 1][..])
        );
        assert_eq!(d.properties.user_properties.as_slice().len(), 1);
        for bad in [
            &b"nope"[..],
            br#"[]"#,
            br#"{"payload":"x"}"#,
            br#"{"topic":"a/+"}"#,
            br#"{"topic":"a","qos":3}"#,
            br#"{"topic":"a","payload":"x","payload_base64":"eA=="}"#,
            br#"{"topic":"a","payload_base64":"!"}"#,
            br#"{"topic":"a","properties":{"bogus":1}}"#,
            br#"{"topic":"a","properties":{"user_properties":[["k"]]}}"#,
            br#"{"topic":"a","payload_base64":"/w==","properties":{"payload_format_indicator":1}}"#,
        ] {
            assert!(draft_of(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
