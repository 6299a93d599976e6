//! The CONNECT handshake: reading and checking CONNECT, authentication (plugins, MQTT 5
//! enhanced authentication and re-authentication), attaching the session, CONNACK.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::broker::Broker;
use crate::codec::{
    self, ConnAck, ConnAckProperties, Connect, DecodeError, Packet, ProtocolVersion, QoS,
    ReasonCode,
};
use crate::message::ClientId;
use crate::metrics::{self, C};
use crate::plugins::events::Event;
use crate::session::{InboundAliases, OutboundAliases};
use crate::session::{NEVER_EXPIRES, PendingWill};

use super::{CLOSE_FLUSH, Conn, ListenerInfo, Reauth};

/// Most AUTH round trips of one enhanced authentication.
const MAX_AUTH_ROUNDS: usize = 16;

/// Runs an MQTT 5 enhanced authentication exchange before CONNACK (MQTT 5 §4.12): AUTH
/// 0x18 with the plugin's data, the client's AUTH 0x18 to the plugin's `auth-step`, until
/// the plugin allows or denies. `None`: the connection failed or timed out (closed without
/// CONNACK); a client that answers with anything but AUTH with the same method is refused
/// as a protocol error.
pub(super) async fn enhanced_auth<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    mut decision: crate::plugins::AuthDecision,
    client_id: &str,
    method: &str,
    rd: &mut R,
    inbuf: &mut BytesMut,
    wr: &mut W,
) -> Option<crate::plugins::AuthDecision> {
    use crate::plugins::AuthDecision;
    let config = broker.current();
    let cfg = &config.mqtt;
    let wait = Duration::from_secs(cfg.connect_timeout);
    for _ in 0..MAX_AUTH_ROUNDS {
        let AuthDecision::Continue {
            plugin,
            auth_data,
            state,
        } = decision
        else {
            return Some(decision);
        };
        let auth = Packet::Auth(crate::codec::Auth {
            reason: ReasonCode::ContinueAuthentication,
            properties: crate::codec::AuthProperties {
                authentication_method: Some(method.to_owned()),
                authentication_data: Some(bytes::Bytes::from(auth_data)),
                ..Default::default()
            },
        });
        let mut out = BytesMut::new();
        codec::encode_packet(&auth, ProtocolVersion::V5, &mut out).ok()?;
        tokio::time::timeout(wait, wr.write_all(&out))
            .await
            .ok()?
            .ok()?;
        let answer = tokio::time::timeout(wait, async {
            loop {
                match codec::decode_packet_limited(
                    inbuf,
                    ProtocolVersion::V5,
                    &cfg.connect_limits(),
                ) {
                    Ok(Some(p)) => return Some(p),
                    Ok(None) => {}
                    Err(_) => return None,
                }
                match rd.read_buf(inbuf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()??;
        decision = match answer {
            Packet::Auth(a)
                if a.reason == ReasonCode::ContinueAuthentication
                    && a.properties.authentication_method.as_deref() == Some(method) =>
            {
                let data = a.properties.authentication_data.map(|d| d.to_vec());
                broker
                    .plugins
                    .auth_step(
                        plugin,
                        client_id.to_owned(),
                        method.to_owned(),
                        data,
                        state,
                        wait,
                    )
                    .await
            }
            other => {
                tracing::info!(
                    packet = other.name(),
                    "enhanced authentication: expected AUTH"
                );
                AuthDecision::Deny(ReasonCode::ProtocolError)
            }
        };
    }
    tracing::info!("enhanced authentication: too many rounds");
    Some(AuthDecision::Deny(ReasonCode::NotAuthorized))
}

#[derive(Debug)]
pub(super) enum ReadError {
    Io(std::io::Error),
    Decode(codec::ConnectError),
}

pub(super) async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    limits: codec::DecodeLimits,
) -> Result<Option<Box<Connect>>, ReadError> {
    loop {
        match codec::decode_connect_limited(buf, &limits) {
            Ok(Some(c)) => return Ok(Some(c)),
            Ok(None) => {}
            Err(e) => return Err(ReadError::Decode(e)),
        }
        match rd.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Answers a CONNECT that could not be decoded: MQTT 5 gets a CONNACK with the reason code;
/// an unsupported protocol level gets the CONNACK its version family understands
/// (MQTT-3.1.2-2, MQTT 5 §3.1.2.2); other 3.x errors just close.
pub(super) async fn refuse_connect<W: AsyncWrite + Unpin>(wr: &mut W, e: &codec::ConnectError) {
    let (version, reason) = match (&e.error, e.version) {
        (DecodeError::UnsupportedProtocolVersion { level }, _) => {
            let v = if *level > 5 {
                ProtocolVersion::V5
            } else {
                ProtocolVersion::V3_1_1
            };
            (v, ReasonCode::UnsupportedProtocolVersion)
        }
        (DecodeError::NotConnect, _) => return,
        (err, Some(ProtocolVersion::V5)) => (ProtocolVersion::V5, err.reason_code()),
        _ => return,
    };
    metrics::inc(metrics::refusal(reason));
    send_connack_and_close(wr, version, reason, CLOSE_FLUSH).await;
}

/// Answers a refused CONNECT with a CONNACK carrying `reason` in the client's version, then
/// closes; each step bounded by `wait`.
pub(crate) async fn send_connack_and_close<W: AsyncWrite + Unpin>(
    wr: &mut W,
    version: ProtocolVersion,
    reason: ReasonCode,
    wait: Duration,
) {
    let ack = ConnAck {
        session_present: false,
        reason,
        properties: ConnAckProperties::default(),
    };
    let mut out = BytesMut::new();
    if codec::encode_packet(&Packet::ConnAck(ack), version, &mut out).is_ok() {
        let _ = tokio::time::timeout(wait, wr.write_all(&out)).await;
    }
    let _ = tokio::time::timeout(wait, wr.shutdown()).await;
}

/// A client identifier for a client that sent none: unique within this process and unlikely
/// to collide with ids clients choose.
pub(super) fn assign_client_id() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let salt = RandomState::new().hash_one(n);
    format!("sandpiper-{salt:016x}{n:x}")
}

impl Conn {
    /// Validates the CONNECT, attaches the session and sends CONNACK. `None` when the
    /// connection was refused (CONNACK with an error was sent) or failed.
    pub(super) async fn accept<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        broker: &Arc<Broker>,
        listener: &ListenerInfo,
        peer: SocketAddr,
        c: Connect,
        (rd, inbuf): (&mut R, &mut BytesMut),
        wr: &mut W,
    ) -> Option<Conn> {
        let config = broker.current();
        let cfg = &config.mqtt;
        let v = c.protocol;
        let refuse = |reason: ReasonCode, why: &'static str| {
            metrics::inc(metrics::refusal(reason));
            tracing::info!(reason = ?reason, client_id = %c.client_id, "connection refused: {why}");
            reason
        };
        let mut refusal = None;
        let mut assigned = None;
        if !listener.protocols.contains(&v) {
            refusal = Some(refuse(
                ReasonCode::UnsupportedProtocolVersion,
                "protocol version not enabled on this listener",
            ));
        } else if c.client_id.is_empty() {
            if v == ProtocolVersion::V3_1 || !cfg.allow_empty_client_id {
                refusal = Some(refuse(
                    ReasonCode::ClientIdentifierNotValid,
                    "empty client id",
                ));
            } else if v == ProtocolVersion::V3_1_1 && !c.clean_start {
                // MQTT-3.1.3-8: an empty id needs Clean Session = 1.
                refusal = Some(refuse(
                    ReasonCode::ClientIdentifierNotValid,
                    "empty client id with clean session 0",
                ));
            } else {
                assigned = Some(assign_client_id());
            }
        }
        // A client whose certificate names it is authenticated by TLS; an authenticate
        // plugin that allows it authenticates it too, and one that denies it refuses it.
        let cert_user = listener.cert_username();
        let mut plugin_auth = crate::plugins::AuthDecision::NoOpinion;
        let method = c.properties.authentication_method.clone();
        let mut reauth = None;
        if refusal.is_none() && broker.plugins.hooks() & crate::plugins::Hooks::AUTHENTICATE != 0 {
            let info = crate::plugins::ConnectInfo {
                client_id: assigned.clone().unwrap_or_else(|| c.client_id.to_string()),
                username: c.username.clone(),
                password: c.password.as_ref().map(|p| p.to_vec()),
                peer,
                listener: listener.name.to_string(),
                protocol: v,
                cert_subject: listener.client_cert.as_ref().map(|c| c.subject.clone()),
                user_properties: c
                    .properties
                    .user_properties
                    .as_slice()
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                auth_method: method.clone(),
                auth_data: c
                    .properties
                    .authentication_data
                    .as_ref()
                    .map(|d| d.to_vec()),
            };
            if method.is_some() {
                reauth = Some(Box::new(Reauth {
                    connect: info.clone(),
                    step: None,
                }));
            }
            let wait = Duration::from_secs(cfg.connect_timeout);
            plugin_auth = broker.plugins.authenticate(info, wait).await;
            if let (crate::plugins::AuthDecision::Continue { .. }, Some(m)) =
                (&plugin_auth, &method)
            {
                let id = assigned.clone().unwrap_or_else(|| c.client_id.to_string());
                plugin_auth = enhanced_auth(broker, plugin_auth, &id, m, rd, inbuf, wr).await?;
            }
            if let crate::plugins::AuthDecision::Deny(reason) = plugin_auth {
                refusal = Some(refuse(reason, "refused by an authentication plugin"));
            }
        }
        let plugin_user = matches!(plugin_auth, crate::plugins::AuthDecision::Allow { .. });
        match plugin_auth {
            crate::plugins::AuthDecision::Allow { .. } => metrics::inc(C::AuthSuccess),
            crate::plugins::AuthDecision::Deny(_) => metrics::inc(C::AuthFailure),
            _ if cert_user.is_some() => metrics::inc(C::AuthSuccess),
            _ => {}
        }
        if refusal.is_none() && !listener.allow_anonymous && cert_user.is_none() && !plugin_user {
            refusal = Some(refuse(
                ReasonCode::NotAuthorized,
                "anonymous clients are not allowed on this listener",
            ));
        }
        if refusal.is_none() && method.is_some() && !plugin_user {
            refusal = Some(refuse(
                ReasonCode::BadAuthenticationMethod,
                "no authentication plugin takes this authentication method",
            ));
        }
        if refusal.is_none() && !cfg.retain_available && c.will.as_ref().is_some_and(|w| w.retain) {
            refusal = Some(refuse(ReasonCode::RetainNotSupported, "retained will"));
        }
        // A will is published like any message, so its topic has the same bounds (MQTT 5
        // §3.2.2.2: 0x90 for a Will Topic the server does not accept).
        if refusal.is_none()
            && c.will
                .as_ref()
                .is_some_and(|w| !cfg.topic_limits().fits(w.topic.as_str()))
        {
            refusal = Some(refuse(
                ReasonCode::TopicNameInvalid,
                "will topic over the length or level limit",
            ));
        }
        if let Some(reason) = refusal {
            send_connack_and_close(wr, v, reason, CLOSE_FLUSH).await;
            return None;
        }

        let client_id: ClientId = match &assigned {
            Some(id) => ClientId::new(id),
            None => ClientId::new(c.client_id.as_str()),
        };
        tracing::Span::current().record("client_id", &*client_id);

        let requested_expiry = if v.is_v5() {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            NEVER_EXPIRES
        };
        let expiry = requested_expiry.min(cfg.max_session_expiry);

        let mut server_keep_alive = None;
        let mut keep_alive = c.keep_alive;
        if v.is_v5()
            && (keep_alive > cfg.max_keep_alive
                || (keep_alive == 0 && cfg.max_keep_alive < u16::MAX))
        {
            keep_alive = cfg.max_keep_alive;
            server_keep_alive = Some(keep_alive);
        }

        let window = c
            .properties
            .receive_maximum
            .map_or(cfg.max_inflight, |r| r.get().min(cfg.max_inflight));

        let (username, attributes, auth_data) = match plugin_auth {
            crate::plugins::AuthDecision::Allow {
                username,
                attributes,
                auth_data,
            } => (username, attributes, auth_data),
            // Only an authenticated user name is the client's identity: the one a
            // client certificate gives. A user name the CONNECT merely claims (on a
            // listener that lets anonymous clients in) never reaches `authorize`.
            _ => (cert_user.map(str::to_owned), Vec::new(), None),
        };
        // Anonymous clients share their listener's principal; an authenticated one has
        // its own, shared by its session, its gate and the registry.
        let principal = match username {
            Some(user) => Arc::new(crate::session::Principal {
                user: Some(user.into()),
                listener: listener.name.clone(),
            }),
            None => listener.anonymous.clone(),
        };
        let mut gate = crate::plugins::gate::Gate::new(
            broker.plugins.clone(),
            crate::plugins::ClientInfo {
                client_id: client_id.clone(),
                principal: principal.clone(),
                attributes: attributes.into_boxed_slice(),
            },
        );
        let mut will = c.will;
        if let Some(w) = &mut will
            && gate.active()
        {
            use crate::plugins::{Action, Verdict};
            match gate.check(Action::Will, w.topic.as_str(), w.qos, w.retain) {
                Verdict::Allow(q) => w.qos = w.qos.min(q.unwrap_or(QoS::ExactlyOnce)),
                Verdict::Deny(reason) => {
                    // MQTT 5 §3.1.2.5: a will the server will not publish refuses the
                    // connect (0x87 unless the plugin named a CONNACK code).
                    refuse(reason, "will refused by an authorization plugin");
                    send_connack_and_close(wr, v, reason, CLOSE_FLUSH).await;
                    return None;
                }
            }
        }
        let mut att = match broker
            .sessions
            .attach(
                client_id.clone(),
                c.clean_start,
                expiry,
                principal,
                cfg.session_principal,
                crate::session::Presence {
                    ip: peer.ip(),
                    port: peer.port(),
                    protocol: v,
                    keep_alive,
                    since_ms: crate::store::record::unix_ms_now(),
                },
            )
            .await
        {
            Ok(att) => att,
            Err(crate::session::AttachRefused::Displaced) => return None,
            Err(crate::session::AttachRefused::OtherPrincipal) => {
                // MQTT 5 §4.11: a session is the server's to give; this one is another
                // user's (or another listener's, for anonymous clients).
                let reason = refuse(
                    ReasonCode::NotAuthorized,
                    "the client id's session belongs to another principal",
                );
                send_connack_and_close(wr, v, reason, CLOSE_FLUSH).await;
                return None;
            }
        };
        let will = will.map(|will| {
            Box::new(PendingWill {
                will,
                origin: att.state.key,
                client: gate.client().clone(),
            })
        });
        if let (Some(w), Some(cluster)) = (&will, &broker.cluster) {
            // For another node to publish should this one die first.
            cluster.will_set(att.conn, w);
        }
        let mut props = ConnAckProperties::default();
        if v.is_v5() {
            if requested_expiry != expiry {
                props.session_expiry_interval = Some(expiry);
            }
            props.receive_maximum = NonZeroU16::new(cfg.receive_maximum);
            props.maximum_packet_size = NonZeroU32::new(cfg.max_packet_size);
            props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
            props.assigned_client_identifier = assigned;
            props.server_keep_alive = server_keep_alive;
            if !cfg.retain_available {
                props.retain_available = Some(false);
            }
            props.wildcard_subscription_available = Some(true);
            if method.is_some() {
                props.authentication_method = method.clone();
                props.authentication_data = auth_data.map(bytes::Bytes::from);
            }
            props.subscription_identifiers_available = Some(true);
            props.shared_subscription_available = Some(true);
        }
        let ack = ConnAck {
            session_present: att.present,
            reason: ReasonCode::Success,
            properties: props,
        };
        // A kick that came before the connection had its session: from here on kicks come
        // through the session's mailbox, where this one joins them.
        if let Ok(k) = att.kick.try_recv() {
            att.state.mailbox.kick(k);
        }
        let mut conn = Conn {
            broker: broker.clone(),
            config: config.clone(),
            version: v,
            state: att.state,
            conn_id: att.conn,
            handed_on: false,
            ka_watch: 0,
            inbuf: BytesMut::new(),
            last_rx: tokio::time::Instant::now(),
            out: super::out::Out::default(),
            batch: VecDeque::new(),
            window,
            client_max_packet: c.properties.maximum_packet_size.map_or(usize::MAX, |m| {
                usize::try_from(m.get()).unwrap_or(usize::MAX)
            }),
            alias_in: InboundAliases::default(),
            alias_out: OutboundAliases::new(c.properties.topic_alias_maximum).map(Box::new),
            will,
            held: VecDeque::new(),
            committed: broker.store.committed(),
            replicated: broker.cluster.as_ref().map(|c| c.replicated()),
            waiting_for_store: false,
            input_stopped: false,
            paused: None,
            keep_alive_ms: u32::from(keep_alive) * 1500,
            connect_expiry: requested_expiry,
            gate,
            pending: Vec::new(),
            reauth,
            revoked: false,
            bridge: c.bridge,
        };
        conn.send_after(att.ticket, &Packet::ConnAck(ack));
        if att.present {
            // Subscriptions were authorized for whoever made them, under the policy of
            // then: asked again before anything is delivered through them.
            conn.reauthorize_subscriptions();
        }
        metrics::inc(C::Connected);
        tracing::info!(
            user = conn.gate.client().username().unwrap_or(""),
            listener = %listener.name,
            protocol = %v,
            clean_start = c.clean_start,
            session_present = att.present,
            keep_alive,
            "client connected"
        );
        if broker.plugins.wants_events() {
            broker.plugins.emit(Event::Connected {
                client: conn.gate.client().clone(),
                peer,
                protocol: v,
                session_present: att.present,
            });
        }
        conn.resend_inflight();
        Some(conn)
    }

    /// Re-authentication (MQTT 5 §4.12.1): AUTH 0x19 starts it with the authenticate
    /// chain, AUTH 0x18 answers a challenge of the plugin that asked. Success is answered
    /// with AUTH 0x00; a refusal disconnects.
    pub(super) fn on_auth(&mut self, a: crate::codec::Auth) -> Result<(), ReasonCode> {
        use crate::plugins::AuthDecision;
        let Some(reauth) = &mut self.reauth else {
            tracing::info!("AUTH without enhanced authentication: protocol error");
            return Err(ReasonCode::ProtocolError);
        };
        let method = reauth.connect.auth_method.clone().unwrap_or_default();
        if a.properties.authentication_method.as_deref() != Some(method.as_str()) {
            tracing::info!("AUTH with another authentication method: protocol error");
            return Err(ReasonCode::ProtocolError);
        }
        let data = a.properties.authentication_data.map(|d| d.to_vec());
        let plugins = self.broker.plugins.clone();
        let decision = match (a.reason, reauth.step.take()) {
            (ReasonCode::ReAuthenticate, None) => {
                let mut info = reauth.connect.clone();
                info.auth_data = data;
                plugins.authenticate_now(info)
            }
            (ReasonCode::ContinueAuthentication, Some((plugin, state))) => {
                let id = self.gate.client().client_id.to_string();
                plugins.auth_step_now(&plugin, id, method.clone(), data, state)
            }
            _ => {
                tracing::info!(reason = ?a.reason, "AUTH out of order: protocol error");
                return Err(ReasonCode::ProtocolError);
            }
        };
        let mut props = crate::codec::AuthProperties {
            authentication_method: Some(method),
            ..Default::default()
        };
        match decision {
            AuthDecision::Allow { auth_data, .. } => {
                props.authentication_data = auth_data.map(bytes::Bytes::from);
                self.send(&Packet::Auth(crate::codec::Auth {
                    reason: ReasonCode::Success,
                    properties: props,
                }));
                Ok(())
            }
            AuthDecision::Continue {
                plugin,
                auth_data,
                state,
            } => {
                props.authentication_data = Some(bytes::Bytes::from(auth_data));
                if let Some(reauth) = &mut self.reauth {
                    reauth.step = Some((plugin, state));
                }
                self.send(&Packet::Auth(crate::codec::Auth {
                    reason: ReasonCode::ContinueAuthentication,
                    properties: props,
                }));
                Ok(())
            }
            AuthDecision::Deny(_) | AuthDecision::NoOpinion => {
                tracing::info!("re-authentication refused");
                Err(ReasonCode::NotAuthorized)
            }
        }
    }
}
