//! The admin API under `/api/v1` (docs/admin-api.md): bearer tokens checked against the
//! hashes of `[[http.token]]`, then JSON reads of the broker's state (clients, sessions,
//! subscriptions, retained messages, plugins) and the changes an operator makes (kick a
//! client, discard a session, clear a retained message, publish). Every changing request
//! is logged with its token's name. Bad input is a 4xx with `{"error": ...}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::{Bytes, Incoming};
use serde_json::{Map, Value, json};

use super::messages::{draft_of, message_json};
use super::tokens::Tokens;
use super::{Answer, reply};
use crate::broker::Broker;
use crate::codec::{MessageProperties, QoS, SubscriptionOptions, TopicFilter, TopicName};
use crate::config::Role;
use crate::message::{ClientId, Draft};
use crate::metrics::{self, C};
use crate::pipeline::Origin;
use crate::plugins::{Control, ControlError, PluginState};

/// Largest request body.
const MAX_BODY: usize = 1 << 20;
/// Page size unless `limit` says otherwise, and its maximum.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
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
        (["bridges"], true, _) => bridges(broker),
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
        "peer": c.presence.peer().to_string(),
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
    let Some(view) = broker.sessions.client(&id) else {
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

/// `GET /bridges`: every bridge's remote, state, counters and topics.
fn bridges(broker: &Arc<Broker>) -> Answer {
    let list: Vec<Value> = (broker.bridges.list().iter())
        .map(|b| {
            let c = &b.config;
            let s = &b.stats;
            let topics: Vec<Value> = (c.topics.iter())
                .map(|t| json!({ "direction": t.direction.as_str(), "local": t.local(), "remote": t.remote(), "qos": t.qos }))
                .collect();
            json!({
                "name": c.name,
                "address": c.address,
                "protocol": c.protocol.as_str(),
                "client_id": c.client_id(),
                "connected": s.connected.load(Ordering::Relaxed),
                "queued": b.queued(),
                "sent": s.sent.load(Ordering::Relaxed),
                "received": s.received.load(Ordering::Relaxed),
                "dropped": s.dropped.load(Ordering::Relaxed),
                "reconnects": s.reconnects.load(Ordering::Relaxed),
                "topics": topics,
            })
        })
        .collect();
    json_reply(StatusCode::OK, &json!({ "bridges": list }))
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

    proptest::proptest! {
        /// Paths and query strings are the client's: any text decodes or is refused,
        /// never a panic, and what decodes is what was encoded.
        #[test]
        fn any_path_or_query_is_safe(raw in ".{0,64}", text in "\\PC{0,32}") {
            let _ = percent_decode(&raw);
            let q = Query::parse(Some(&raw));
            let _ = q.limit();
            let encoded: String = text.bytes().map(|b| format!("%{b:02X}")).collect();
            proptest::prop_assert_eq!(percent_decode(&encoded), Some(text));
        }
    }
}
