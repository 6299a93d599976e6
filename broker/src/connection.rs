//! One task per client connection: read → decode → act on the session → route; drain the
//! session's mailbox → encode → write. Reads and writes are multiplexed in one `select!` so a
//! client that does not read cannot stall us reading its acks, and a client that floods us
//! cannot make us buffer without bound (reading stops while our write buffer is full).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::broker::Broker;
use crate::codec::{
    self, Ack, ConnAck, ConnAckProperties, Connect, DecodeError, Disconnect, Packet,
    ProtocolVersion, Publish, PublishProperties, PublishQoS, QoS, ReasonCode, SubAck, Subscribe,
    TopicFilter, TopicName, UnsubAck, Unsubscribe,
};
use crate::message::{Delivery, Message};
use crate::metrics::METRICS;
use crate::plugins::events::{DropReason, Event};
use crate::plugins::flow::{Draft, Fate, Rejection};
use crate::session::{Inflight, Kick, NEVER_EXPIRES, PendingWill, Stage, Subscription};
use crate::store::{Op, record};

/// Facts about the listener a connection came through (and, for TLS, about the client's
/// certificate: the future authenticate hook gets them from here).
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// Listener name, for logs and plugins.
    pub name: Arc<str>,
    /// Whether unauthenticated clients may connect.
    pub allow_anonymous: bool,
    /// MQTT versions accepted; a CONNECT of another gets 0x84 (3.x: return code 1).
    pub protocols: Vec<ProtocolVersion>,
    /// Whether a verified client certificate's Common Name is the client's user name, which
    /// also makes the client authenticated.
    pub username_from_cert: bool,
    /// The client certificate this connection presented, verified against the listener's
    /// client CA (TLS listeners only; set per connection).
    pub client_cert: Option<crate::transport::tls::ClientCert>,
}

impl ListenerInfo {
    /// The user name a verified client certificate gives, when the listener uses it
    /// (`username_from_cert`): the certificate's Common Name.
    pub fn cert_username(&self) -> Option<&str> {
        if !self.username_from_cert {
            return None;
        }
        self.client_cert.as_ref()?.common_name.as_deref()
    }
}

/// Stop taking deliveries from the mailbox once this much is waiting to be written.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// Stop reading from the client while this much is waiting to be written to it.
const OUT_READ_LIMIT: usize = 1024 * 1024;
/// Most deliveries taken from the mailbox in one go.
const DRAIN_BATCH: usize = 256;
/// Smallest and largest read buffer reservation. An idle connection keeps the small one
/// (memory per idle client is what limits how many a broker holds); a busy one doubles it
/// while reads fill it.
const MIN_READ: usize = 64;
const MAX_READ: usize = 64 * 1024;
/// How long a closing connection tries to flush its last packets.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// Most publishes handed to the transform hook in one call.
const TRANSFORM_BATCH: usize = 64;
/// Most store tickets a connection's held acknowledgements may wait for: beyond, it stops
/// handling and reading packets until the store has caught up, so a client cannot queue
/// unbounded work for the store (each ticket is one submission).
const MAX_HELD: usize = 1024;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// DISCONNECT with reason 0x00: the will is discarded.
    Normal,
    /// DISCONNECT with any other reason (0x04 asks for the will explicitly).
    ClientWithWill,
    /// The socket closed or failed without DISCONNECT.
    Lost,
    /// The client broke the protocol; MQTT 5 clients are told why.
    Error(ReasonCode),
    /// No packet within 1.5 × keep alive (MQTT-3.1.2-24).
    KeepAlive,
    /// Another connection took the session (MQTT-3.1.4-3).
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
}

impl Close {
    /// Whether the broker ends the connection while the client may still be sending:
    /// after a protocol error or a takeover (not after the client's DISCONNECT or close,
    /// a keep-alive timeout, when the client sent nothing for a while, or at shutdown,
    /// which should not wait for clients).
    fn broker_first(self) -> bool {
        matches!(self, Close::Error(_) | Close::TakenOver)
    }

    /// The DISCONNECT reason sent to an MQTT 5 client, if one is sent.
    fn reason(self) -> Option<ReasonCode> {
        match self {
            Close::Error(r) => Some(r),
            Close::KeepAlive => Some(ReasonCode::KeepAliveTimeout),
            Close::TakenOver => Some(ReasonCode::SessionTakenOver),
            Close::Shutdown => Some(ReasonCode::ServerShuttingDown),
            Close::Normal | Close::ClientWithWill | Close::Lost => None,
        }
    }
}

/// Moves `timer` earlier to `at`; a later deadline is left for the timer's branch to find.
fn arm(timer: std::pin::Pin<&mut tokio::time::Sleep>, at: tokio::time::Instant) {
    if at < timer.deadline() {
        timer.reset(at);
    }
}

/// Serves one client until it disconnects, fails, is taken over, or the broker stops.
pub async fn run<R, W>(
    broker: Arc<Broker>,
    listener: Arc<ListenerInfo>,
    peer: SocketAddr,
    mut rd: R,
    mut wr: W,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cfg = &broker.config.mqtt;
    let mut inbuf = BytesMut::with_capacity(MIN_READ);
    let deadline = Duration::from_secs(cfg.connect_timeout);
    let first = tokio::select! {
        _ = broker.shutdown.cancelled() => return,
        r = tokio::time::timeout(deadline, read_connect(&mut rd, &mut inbuf, cfg.connect_limits())) => r,
    };
    let connect = match first {
        Err(_) => {
            tracing::info!("no CONNECT within {}s: closing", cfg.connect_timeout);
            return;
        }
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return,
        Ok(Err(ReadError::Io(e))) => {
            tracing::debug!(error = %e, "read failed before CONNECT");
            return;
        }
        Ok(Err(ReadError::Decode(e))) => {
            tracing::info!(error = %e.error, "bad CONNECT: closing");
            Box::pin(async move {
                refuse_connect(&mut wr, &e).await;
                linger(&mut rd).await;
            })
            .await;
            return;
        }
    };
    tracing::trace!(%peer, "CONNECT received");
    // Accepting (authentication plugins, session takeover, and the linger after a refusal)
    // and finishing are boxed so that their state does not enlarge the future every idle
    // connection keeps while serving. (Awaiting the linger here, with the `Option<Conn>`
    // of the refusal still in scope, cost every connection the size of a `Conn`.)
    let accept = Box::pin(async {
        let conn = Conn::accept(
            &broker,
            &listener,
            peer,
            *connect,
            (&mut rd, &mut inbuf),
            &mut wr,
        )
        .await;
        if conn.is_none() {
            // Refused (CONNACK with a reason code sent) or failed.
            linger(&mut rd).await;
        }
        conn
    });
    let Some(mut conn) = accept.await else {
        return;
    };
    let close = conn.serve(&mut rd, &mut wr, inbuf).await;
    Box::pin(async move {
        conn.finish(close, &mut wr).await;
        if close.broker_first() {
            linger(&mut rd).await;
        }
    })
    .await;
}

/// How long, and for how many bytes, a connection the broker closed first keeps reading.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// Reads and discards what the client still sends after the broker has written its last
/// packet (a CONNACK or DISCONNECT with a reason code) and shut down its side, until the
/// client closes, [`LINGER`] passes or [`LINGER_BYTES`] were read. A socket closed with
/// unread data in its receive buffer is reset (RFC 1122 §4.2.2.13), and a reset destroys
/// what the client has not read yet: the packet that tells it why, and the
/// acknowledgements before it.
pub(crate) async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Most AUTH round trips of one enhanced authentication.
const MAX_AUTH_ROUNDS: usize = 16;

/// Runs an MQTT 5 enhanced authentication exchange before CONNACK (MQTT 5 §4.12): AUTH
/// 0x18 with the plugin's data, the client's AUTH 0x18 to the plugin's `auth-step`, until
/// the plugin allows or denies. `None`: the connection failed or timed out (closed without
/// CONNACK); a client that answers with anything but AUTH with the same method is refused
/// as a protocol error.
async fn enhanced_auth<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    mut decision: crate::plugins::AuthDecision,
    client_id: &str,
    method: &str,
    rd: &mut R,
    inbuf: &mut BytesMut,
    wr: &mut W,
) -> Option<crate::plugins::AuthDecision> {
    use crate::plugins::AuthDecision;
    let cfg = &broker.config.mqtt;
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
                AuthDecision::Deny(ReasonCode::ProtocolError.code())
            }
        };
    }
    tracing::info!("enhanced authentication: too many rounds");
    Some(AuthDecision::Deny(ReasonCode::NotAuthorized.code()))
}

#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Decode(codec::ConnectError),
}

async fn read_connect<R: AsyncRead + Unpin>(
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
async fn refuse_connect<W: AsyncWrite + Unpin>(wr: &mut W, e: &codec::ConnectError) {
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

/// A connected client.
struct Conn {
    broker: Arc<Broker>,
    version: ProtocolVersion,
    state: crate::session::SessionState,
    conn_id: u64,
    kick: tokio::sync::oneshot::Receiver<Kick>,
    out: BytesMut,
    batch: VecDeque<Delivery>,
    /// Outbound inflight window: min(client Receive Maximum, max_inflight).
    window: usize,
    /// The client's Maximum Packet Size.
    client_max_packet: usize,
    /// Topic aliases the client defined (index = alias − 1).
    alias_in: Vec<Option<TopicName>>,
    /// Topic aliases we define toward the client, if it allows any. Boxed, as are the
    /// will and the re-authentication state: most clients use none of them, and every
    /// byte here is kept by every idle connection.
    alias_out: Option<Box<OutAliases>>,
    will: Option<Box<PendingWill>>,
    keep_alive: Option<Duration>,
    /// Packets waiting for a store ticket to be durable, in send order.
    held: VecDeque<(u64, BytesMut)>,
    /// The highest durable store ticket.
    committed: tokio::sync::watch::Receiver<u64>,
    /// Queued messages are on disk but not yet readable: fill again after the next commit.
    waiting_for_store: bool,
    /// A subscriber of ours is congested: reading stops until it has room, or until the
    /// deadline, after which it is marked slow.
    paused: Option<(Arc<crate::mailbox::Mailbox>, tokio::time::Instant)>,
    /// Session expiry asked for in CONNECT, to check DISCONNECT against (MQTT-3.14.2-2).
    connect_expiry: u32,
    /// Authorization by plugins, with this connection's cached decisions.
    gate: crate::plugins::gate::Gate,
    /// Publishes of the current read waiting for the transform hook, in order.
    pending: Vec<(Draft, PublishQoS)>,
    /// What the CONNECT of a client using MQTT 5 enhanced authentication said, for
    /// re-authentication (MQTT 5 §4.12.1).
    reauth: Option<Box<Reauth>>,
    /// A subscription was revoked by a policy change: deliveries queued before (on disk
    /// too) are checked against the subscriptions left before they are sent.
    revoked: bool,
}

/// Topic aliases defined toward the client (MQTT 5 §3.3.2.3.4).
struct OutAliases {
    by_topic: HashMap<TopicName, NonZeroU16>,
    /// The client's Topic Alias Maximum.
    max: u16,
}

/// What re-authentication needs (MQTT 5 §4.12.1).
struct Reauth {
    /// What the client's CONNECT said.
    connect: crate::plugins::ConnectInfo,
    /// An exchange in progress: the plugin and its state.
    step: Option<(Arc<crate::plugins::Plugin>, Vec<u8>)>,
}

impl Conn {
    /// Validates the CONNECT, attaches the session and sends CONNACK. `None` when the
    /// connection was refused (CONNACK with an error was sent) or failed.
    async fn accept<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        broker: &Arc<Broker>,
        listener: &ListenerInfo,
        peer: SocketAddr,
        c: Connect,
        (rd, inbuf): (&mut R, &mut BytesMut),
        wr: &mut W,
    ) -> Option<Conn> {
        let cfg = &broker.config.mqtt;
        let v = c.protocol;
        let refuse = |reason: ReasonCode, why: &'static str| {
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
            if let crate::plugins::AuthDecision::Deny(code) = plugin_auth {
                let reason = ReasonCode::from_u8(code).unwrap_or(ReasonCode::NotAuthorized);
                refusal = Some(refuse(reason, "refused by an authentication plugin"));
            }
        }
        let plugin_user = matches!(plugin_auth, crate::plugins::AuthDecision::Allow { .. });
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

        let client_id: Arc<str> = match &assigned {
            Some(id) => Arc::from(id.as_str()),
            None => Arc::from(c.client_id.as_str()),
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
            .map_or(usize::from(cfg.max_inflight), |r| {
                usize::from(r.get().min(cfg.max_inflight))
            });

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
        let principal = crate::session::Principal {
            user: username.as_deref().map(Arc::from),
            listener: listener.name.clone(),
        };
        let mut gate = crate::plugins::gate::Gate::new(
            broker.plugins.clone(),
            crate::plugins::ClientInfo {
                client_id: client_id.clone(),
                username,
                listener: listener.name.clone(),
                attributes,
            },
        );
        let mut will = c.will;
        if let Some(w) = &mut will
            && gate.active()
        {
            use crate::plugins::{Action, Verdict};
            match gate.check(Action::Will, w.topic.as_str(), w.qos, w.retain) {
                Verdict::Allow(q) => w.qos = w.qos.min(q.unwrap_or(QoS::ExactlyOnce)),
                Verdict::Deny(code) => {
                    // MQTT 5 §3.1.2.5: a will the server will not publish refuses the
                    // connect (0x87 unless the plugin named a CONNACK code).
                    let reason = ReasonCode::from_u8(crate::plugins::connack_code(code))
                        .unwrap_or(ReasonCode::NotAuthorized);
                    refuse(reason, "will refused by an authorization plugin");
                    send_connack_and_close(wr, v, reason, CLOSE_FLUSH).await;
                    return None;
                }
            }
        }
        let att = match broker
            .sessions
            .attach(
                client_id.clone(),
                c.clean_start,
                expiry,
                principal,
                cfg.session_principal,
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
            })
        });
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
        let mut conn = Conn {
            broker: broker.clone(),
            version: v,
            state: att.state,
            conn_id: att.conn,
            kick: att.kick,
            out: BytesMut::new(),
            batch: VecDeque::new(),
            window,
            client_max_packet: c.properties.maximum_packet_size.map_or(usize::MAX, |m| {
                usize::try_from(m.get()).unwrap_or(usize::MAX)
            }),
            alias_in: Vec::new(),
            alias_out: c
                .properties
                .topic_alias_maximum
                .filter(|&max| max > 0)
                .map(|max| {
                    Box::new(OutAliases {
                        by_topic: HashMap::new(),
                        max,
                    })
                }),
            will,
            held: VecDeque::new(),
            committed: broker.store.committed(),
            waiting_for_store: false,
            paused: None,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            connect_expiry: requested_expiry,
            gate,
            pending: Vec::new(),
            reauth,
            revoked: false,
        };
        conn.send_after(att.ticket, &Packet::ConnAck(ack));
        if att.present {
            // Subscriptions were authorized for whoever made them, under the policy of
            // then: asked again before anything is delivered through them.
            conn.reauthorize_subscriptions();
        }
        tracing::debug!(version = %v, clean_start = c.clean_start, present = att.present, keep_alive, "connected");
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

    /// The main loop.
    async fn serve<R, W>(&mut self, rd: &mut R, wr: &mut W, mut inbuf: BytesMut) -> Close
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mailbox = self.state.mailbox.clone();
        let shutdown = self.broker.shutdown.clone();
        let mut last_rx = tokio::time::Instant::now();
        let ka = self.keep_alive;
        let mut kick_gone = false;
        let mut read_hint = MIN_READ;
        // A packet started but not finished must be within `packet_timeout` (a client that
        // sends half a packet and stalls is dropped, not kept by its keep alive).
        let packet_timeout = Duration::from_secs(self.broker.config.mqtt.packet_timeout);
        let mut partial_since: Option<tokio::time::Instant> = None;
        // One timer serves both deadlines (keep alive and partial packet): it fires at the
        // earlier one or before, and its branch works out which has passed. Each timer is
        // state every idle connection keeps.
        let timer = tokio::time::sleep(ka.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(timer);

        // Packets that arrived together with CONNECT.
        if let Some(close) = self.handle_input(&mut inbuf) {
            return close;
        }
        if !inbuf.is_empty() {
            let now = tokio::time::Instant::now();
            partial_since = Some(now);
            arm(timer.as_mut(), now + packet_timeout);
        }
        loop {
            self.fill();
            if !self.held.is_empty() {
                self.release_held();
                // Packets read before the held acknowledgements filled up wait in `inbuf`:
                // handled now that there is room (the client may be sending nothing more
                // until they are answered).
                if self.held.len() < MAX_HELD && self.paused.is_none() && !inbuf.is_empty() {
                    let before = inbuf.len();
                    if let Some(close) = self.handle_input(&mut inbuf) {
                        return close;
                    }
                    if inbuf.is_empty() {
                        partial_since = None;
                    } else if inbuf.len() < before {
                        let now = tokio::time::Instant::now();
                        partial_since = Some(now);
                        arm(timer.as_mut(), now + packet_timeout);
                    }
                }
            }
            let want_read = self.out.len() < OUT_READ_LIMIT
                && self.paused.is_none()
                && self.held.len() < MAX_HELD;
            if !want_read && partial_since.is_some() {
                // Not reading is our doing: the client's time to finish its packet starts
                // again when we read again.
                partial_since = Some(tokio::time::Instant::now());
            }
            if want_read && inbuf.capacity() - inbuf.len() < read_hint {
                if inbuf.is_empty() && inbuf.capacity() > 4 * read_hint {
                    // Give back what a burst grew.
                    inbuf = BytesMut::with_capacity(read_hint);
                } else {
                    inbuf.reserve(read_hint);
                }
            }
            if self.out.is_empty() && self.out.capacity() > OUT_HIGH_WATER * 4 {
                self.out = BytesMut::new();
            }
            let spare = inbuf.capacity() - inbuf.len();
            let paused = self.paused.clone();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Close::Shutdown,
                k = &mut self.kick, if !kick_gone => {
                    match k {
                        Ok(Kick::TakenOver) => return Close::TakenOver,
                        // The registry dropped our kick sender without using it: nothing
                        // can kick us any more; keep serving.
                        Err(_) => kick_gone = true,
                    }
                }
                r = wr.write_buf(&mut self.out), if !self.out.is_empty() => {
                    match r {
                        Ok(0) | Err(_) => return Close::Lost,
                        Ok(_) => {}
                    }
                }
                r = rd.read_buf(&mut inbuf), if want_read => {
                    match r {
                        Ok(0) | Err(_) => return Close::Lost,
                        Ok(n) => {
                            read_hint = if n >= spare {
                                (read_hint * 2).min(MAX_READ)
                            } else if n < read_hint / 4 {
                                (read_hint / 2).max(MIN_READ)
                            } else {
                                read_hint
                            };
                            last_rx = tokio::time::Instant::now();
                            let before = inbuf.len();
                            if let Some(close) = self.handle_input(&mut inbuf) {
                                return close;
                            }
                            if inbuf.is_empty() {
                                partial_since = None;
                            } else if partial_since.is_none() || inbuf.len() < before {
                                // A new packet started (or one completed and the next began).
                                partial_since = Some(last_rx);
                                arm(timer.as_mut(), last_rx + packet_timeout);
                            }
                        }
                    }
                }
                _ = mailbox.notified() => {}
                room = wait_for_room(&paused), if paused.is_some() => {
                    if !room && let Some((mb, _)) = &paused {
                        mb.mark_stalled();
                    }
                    self.paused = None;
                    // Packets read before the pause, not handled yet.
                    if let Some(close) = self.handle_input(&mut inbuf) {
                        return close;
                    }
                    if inbuf.is_empty() {
                        partial_since = None;
                    }
                }
                r = self.committed.changed(), if !self.held.is_empty() || self.waiting_for_store => {
                    if r.is_err() {
                        // The store is gone (shutting down): nothing more becomes durable.
                        return Close::Shutdown;
                    }
                    self.release_held();
                }
                _ = &mut timer, if ka.is_some() || partial_since.is_some() => {
                    let now = tokio::time::Instant::now();
                    // A paused connection is not reading: its partial packet cannot progress.
                    let partial_due = partial_since.filter(|_| want_read).map(|t| t + packet_timeout);
                    if partial_due.is_some_and(|due| due <= now) {
                        tracing::info!("partial packet not completed within {}s: closing", packet_timeout.as_secs());
                        return Close::Lost;
                    }
                    let ka_due = ka.map(|limit| last_rx + limit);
                    if ka_due.is_some_and(|due| due <= now) {
                        tracing::info!("keep alive timeout");
                        return Close::KeepAlive;
                    }
                    let next = match (partial_due, ka_due) {
                        (Some(p), Some(k)) => p.min(k),
                        (Some(p), None) => p,
                        (None, Some(k)) => k,
                        // Paused with a partial packet and no keep alive: look again later.
                        (None, None) => now + packet_timeout,
                    };
                    timer.as_mut().reset(next);
                }
            }
        }
    }

    /// Decodes and handles every complete packet in `inbuf`.
    /// Stops early while a subscriber we published to is congested: the rest waits in
    /// `inbuf` until it has room, so one read cannot overrun a queue.
    fn handle_input(&mut self, inbuf: &mut BytesMut) -> Option<Close> {
        let close = self.decode_input(inbuf);
        // Publishes before the packet that closes were accepted: they are answered first.
        self.flush_pending().or(close)
    }

    fn decode_input(&mut self, inbuf: &mut BytesMut) -> Option<Close> {
        let limits = self.broker.config.mqtt.decode_limits();
        loop {
            if self.paused.is_some() || self.held.len() >= MAX_HELD {
                return None;
            }
            match codec::decode_packet_limited(inbuf, self.version, &limits) {
                Ok(Some(p)) => {
                    // Answers keep the order of the packets they answer.
                    if !matches!(p, Packet::Publish(_))
                        && let Some(close) = self.flush_pending()
                    {
                        return Some(close);
                    }
                    if let Some(close) = self.handle(p) {
                        return Some(close);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::info!(error = %e, "bad packet: closing");
                    return Some(Close::Error(e.reason_code()));
                }
            }
        }
    }

    /// Runs the transform hook over the publishes waiting for it, then routes and answers
    /// each in order.
    fn flush_pending(&mut self) -> Option<Close> {
        if self.pending.is_empty() {
            return None;
        }
        let (mut drafts, flows): (Vec<Draft>, Vec<PublishQoS>) =
            std::mem::take(&mut self.pending).into_iter().unzip();
        let mut fates = vec![Fate::Route; drafts.len()];
        let plugins = self.broker.plugins.clone();
        plugins.transform(self.gate.client(), &mut drafts, &mut fates, None);
        for ((d, flow), fate) in drafts.into_iter().zip(flows).zip(fates) {
            let r = match fate {
                Fate::Route => {
                    let msg = self.message(d);
                    self.accept_publish(Some(&msg), flow)
                }
                Fate::Drop => {
                    tracing::debug!(topic = %d.topic.as_str(), "PUBLISH dropped by a transform plugin");
                    self.dropped(String::new(), d.topic.as_str(), DropReason::Plugin);
                    self.accept_publish(None, flow)
                }
                Fate::Reject(code) => {
                    tracing::debug!(topic = %d.topic.as_str(), code, "PUBLISH rejected by a transform plugin");
                    match Rejection::of(code) {
                        _ if !self.version.is_v5() => self.accept_publish(None, flow),
                        Rejection::Ack(code) => self.refuse_publish(flow, code),
                        Rejection::Disconnect(code) => {
                            Err(ReasonCode::from_u8(code).unwrap_or(ReasonCode::NotAuthorized))
                        }
                    }
                }
            };
            if let Err(reason) = r {
                return Some(Close::Error(reason));
            }
        }
        None
    }

    /// The message a draft becomes once routed.
    fn message(&self, d: Draft) -> Arc<Message> {
        d.into_message(self.state.key)
    }

    /// Tells the events hook that a message was dropped (for `client_id`, or for everyone).
    fn dropped(&self, client_id: String, topic: &str, reason: DropReason) {
        if self.broker.plugins.wants_events() {
            self.broker.plugins.emit(Event::MessageDropped {
                client_id,
                topic: topic.to_owned(),
                reason,
            });
        }
    }

    /// Sends the connection's last words, publishes or keeps the will, and gives the session
    /// back to the registry.
    async fn finish<W: AsyncWrite + Unpin>(mut self, close: Close, wr: &mut W) {
        tracing::debug!(?close, "closing");
        if self.broker.plugins.wants_events() {
            let reason = match close {
                Close::Normal => Some(0),
                Close::ClientWithWill => Some(ReasonCode::DisconnectWithWill.code()),
                other => other.reason().map(ReasonCode::code),
            };
            self.broker.plugins.emit(Event::Disconnected {
                client: self.gate.client().clone(),
                reason,
            });
        }
        // From here on the session is offline: QoS 0 messages are no longer accepted for it
        // and those still queued are dropped (MQTT-3.1.2-5 makes keeping them optional).
        self.state.mailbox.set_online(false);
        self.state.mailbox.extract(|d| d.qos == QoS::AtMostOnce);
        if let Some(&(last, _)) = self.held.back() {
            // Acknowledgements promised on durability go out only once durable.
            let mut committed = self.committed.clone();
            let _ = tokio::time::timeout(CLOSE_FLUSH, committed.wait_for(|c| *c >= last)).await;
            self.release_held();
            self.held.clear();
        }
        if self.version.is_v5()
            && let Some(reason) = close.reason()
        {
            self.send(&Packet::Disconnect(Disconnect::new(reason)));
        }
        if !self.out.is_empty() {
            let _ = tokio::time::timeout(CLOSE_FLUSH, wr.write_all(&self.out)).await;
        }
        let _ = tokio::time::timeout(CLOSE_FLUSH, wr.shutdown()).await;
        // Deliveries taken from the mailbox but not sent go back to it, in order.
        let unsent = std::mem::take(&mut self.batch);
        if !unsent.is_empty() {
            let kept: Vec<Delivery> = unsent
                .into_iter()
                .filter(|d| d.qos != QoS::AtMostOnce)
                .collect();
            self.state.mailbox.unshift(kept.into_iter());
        }
        let will = match close {
            Close::Normal | Close::Shutdown => None,
            _ => self.will.take().map(|w| *w),
        };
        self.broker.sessions.detach(self.conn_id, self.state, will);
    }

    /// Encodes a packet into the write buffer, behind any packet still held for the store.
    fn send(&mut self, p: &Packet) {
        self.send_after(None, p);
    }

    /// Encodes a packet to be written once store ticket `ticket` is durable (a PUBACK,
    /// PUBREC or SUBACK that promises what is on disk). Output keeps its order: anything
    /// sent after a held packet waits for it.
    fn send_after(&mut self, ticket: Option<u64>, p: &Packet) {
        let last = self.held.back().map(|(t, _)| *t);
        let ticket = match ticket.max(last) {
            None => None,
            Some(t) if last.is_none() && t <= *self.committed.borrow() => None,
            Some(t) => Some(t),
        };
        let Some(ticket) = ticket else {
            if let Err(e) = codec::encode_packet(p, self.version, &mut self.out) {
                tracing::warn!(error = %e, packet = p.name(), "cannot encode packet");
            }
            return;
        };
        let mut buf = match self.held.pop_back() {
            Some((t, buf)) if t == ticket => buf,
            Some(other) => {
                self.held.push_back(other);
                BytesMut::new()
            }
            None => BytesMut::new(),
        };
        if let Err(e) = codec::encode_packet(p, self.version, &mut buf) {
            tracing::warn!(error = %e, packet = p.name(), "cannot encode packet");
        }
        self.held.push_back((ticket, buf));
    }

    /// Moves held packets whose tickets are durable to the write buffer.
    fn release_held(&mut self) {
        let done = *self.committed.borrow();
        while self.held.front().is_some_and(|(t, _)| *t <= done) {
            if let Some((_, buf)) = self.held.pop_front() {
                self.out.extend_from_slice(&buf);
            }
        }
    }

    /// Resends, with DUP, every unacknowledged PUBLISH and PUBREL of a resumed session
    /// (MQTT-4.4.0-1).
    fn resend_inflight(&mut self) {
        let inflight = std::mem::take(&mut self.state.inflight);
        let now = Instant::now();
        for f in &inflight {
            match f.stage {
                Stage::AwaitComp => self.send(&Packet::PubRel(Ack::success(f.id))),
                Stage::AwaitAck | Stage::AwaitRec => {
                    if let Some(p) = self.build_publish(&f.delivery, Some(f.id), true, now) {
                        self.send(&Packet::Publish(p));
                    }
                }
            }
        }
        self.state.inflight = inflight;
    }

    /// Asks the authorize chain again about every subscription the session holds (at
    /// resume, and whenever the chain changed): a filter now denied is unsubscribed
    /// (logged, and an `unsubscribed` event), one now allowed at a lower QoS is lowered,
    /// and deliveries queued through removed filters alone are dropped.
    #[cold]
    #[inline(never)]
    fn reauthorize_subscriptions(&mut self) {
        self.gate.subscriptions_authorized();
        if !self.gate.checks_subscriptions() || self.state.subscriptions.is_empty() {
            return;
        }
        let held: Vec<(TopicFilter, Subscription)> = (self.state.subscriptions.iter())
            .map(|(f, s)| (f.clone(), *s))
            .collect();
        let asked: Vec<_> = (held.iter()).map(|(f, s)| (f, s.options.qos)).collect();
        let verdicts = self.gate.check_subscriptions(&asked);
        drop(asked);
        let sub = self.state.subscriber();
        let mut removed = 0;
        for ((filter, mut s), verdict) in held.into_iter().zip(verdicts) {
            match verdict {
                crate::plugins::Verdict::Deny(code) => {
                    tracing::info!(filter = %filter.as_str(), code, "subscription no longer authorized: removed");
                    self.state.subscriptions.remove(&filter);
                    self.broker.router.unsubscribe(self.state.key, &filter);
                    self.broker
                        .sessions
                        .save_subscription(&self.state, &filter, None);
                    if self.broker.plugins.wants_events() {
                        self.broker.plugins.emit(Event::Unsubscribed {
                            client: self.gate.client().clone(),
                            filter: filter.as_str().to_owned(),
                        });
                    }
                    removed += 1;
                }
                crate::plugins::Verdict::Allow(Some(q)) if q < s.options.qos => {
                    s.options.qos = q;
                    self.broker.router.subscribe(&sub, &filter, s.options, s.id);
                    self.state.subscriptions.insert(filter.clone(), s);
                    self.broker
                        .sessions
                        .save_subscription(&self.state, &filter, Some(s));
                }
                crate::plugins::Verdict::Allow(_) => {}
            }
        }
        if removed > 0 {
            // What was queued through a removed subscription (and through no remaining
            // one) is not delivered: checked as it leaves the queue, which may hold it on
            // disk.
            self.revoked = true;
        }
    }

    /// Drops the deliveries of `batch` that no held subscription still brings (queued
    /// through a subscription a policy change removed). Kept out of `fill`'s loop, whose
    /// code every delivery runs.
    #[cold]
    #[inline(never)]
    fn drop_revoked(&mut self, batch: &mut VecDeque<Delivery>) {
        let mut kept = VecDeque::with_capacity(batch.len());
        for d in batch.drain(..) {
            if self.still_subscribed(&d) {
                kept.push_back(d);
            } else {
                tracing::debug!(topic = %d.msg.topic, "queued through a revoked subscription: dropped");
                self.state.mailbox.forget(&d);
            }
        }
        *batch = kept;
        if self.state.mailbox.is_empty() {
            // Everything queued before the revocation has been through here.
            self.revoked = false;
        }
    }

    /// Whether a delivery still comes through a subscription the session holds.
    fn still_subscribed(&self, d: &Delivery) -> bool {
        let subs = &self.state.subscriptions;
        match &d.shared {
            Some(f) => subs.contains_key(f),
            None => subs.keys().any(|f| {
                f.share_group().is_none() && codec::filter_matches(f.filter(), d.msg.topic.as_str())
            }),
        }
    }

    /// Moves deliveries from the mailbox into the write buffer, within the inflight window.
    fn fill(&mut self) {
        // Without plugins that check subscriptions everything held is allowed: the one
        // load of the hook mask (hot, read below too) spares the chain's generation.
        if self.gate.checks_subscriptions() && self.gate.subscriptions_outdated() {
            self.reauthorize_subscriptions();
        }
        if self.out.len() >= OUT_HIGH_WATER {
            return;
        }
        let credits = self.window.saturating_sub(self.state.inflight.len());
        let mut batch = std::mem::take(&mut self.batch);
        self.waiting_for_store = !self.state.mailbox.drain(&mut batch, DRAIN_BATCH, credits);
        if self.broker.plugins.hooks() & crate::plugins::Hooks::DELIVER != 0 {
            let plugins = self.broker.plugins.clone();
            for d in plugins.deliver(self.gate.client(), &mut batch) {
                self.dropped(
                    self.gate.client().client_id.to_string(),
                    d.msg.topic.as_str(),
                    DropReason::Plugin,
                );
                self.state.mailbox.forget(&d);
            }
        }
        if self.revoked {
            self.drop_revoked(&mut batch);
        }
        let now = Instant::now();
        while let Some(d) = batch.pop_front() {
            self.deliver(d, now);
            if self.out.len() >= OUT_HIGH_WATER * 4 {
                break;
            }
        }
        self.batch = batch;
        if !self.batch.is_empty() {
            // Hand the rest back so order holds and a later fill takes them first.
            let rest = std::mem::take(&mut self.batch);
            self.state.mailbox.unshift(rest.into_iter());
        }
    }

    /// Sends one delivery: drops it if expired or too large for the client, otherwise
    /// assigns a packet identifier (QoS 1/2) and encodes it.
    fn deliver(&mut self, d: Delivery, now: Instant) {
        if d.msg.is_expired(now) {
            METRICS.expired_dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped(
                self.gate.client().client_id.to_string(),
                d.msg.topic.as_str(),
                DropReason::Expired,
            );
            self.state.mailbox.forget(&d);
            return;
        }
        let id = if d.qos == QoS::AtMostOnce {
            None
        } else {
            match self.state.allocate_id() {
                Some(id) => Some(id),
                None => return,
            }
        };
        let Some(p) = self.build_publish(&d, id, false, now) else {
            self.state.mailbox.forget(&d);
            return;
        };
        // A QoS 2 message of a persistent session is sent once its packet id is durable:
        // after a restart it is resent with the same id, so the receiver can tell the
        // duplicate (exactly once, MQTT 4.3.3). A QoS 1 message's id is recorded too, without
        // waiting: after a restart it is resent with DUP and, if the record made it, its
        // original id (MQTT-4.4.0-1); at least once holds either way.
        let mut ticket = None;
        if let (Some(id), Some(sid), Some((store, key))) =
            (id, d.store_id, self.state.mailbox.store())
        {
            let stage = if d.qos == QoS::ExactlyOnce {
                Stage::AwaitRec
            } else {
                Stage::AwaitAck
            };
            match record::encode_queued(&d, Some((id, stage))) {
                Ok(bytes) => {
                    let t = store.submit_one(Op::PutQueued(key, sid, bytes));
                    if stage == Stage::AwaitRec {
                        ticket = t;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot store an in-flight message"),
            }
        }
        self.send_after(ticket, &Packet::Publish(p));
        METRICS.publish_sent.fetch_add(1, Ordering::Relaxed);
        if let Some(id) = id {
            let stage = if d.qos == QoS::AtLeastOnce {
                Stage::AwaitAck
            } else {
                Stage::AwaitRec
            };
            self.state.inflight.push_back(Inflight {
                id,
                delivery: d,
                stage,
            });
        }
    }

    /// Builds the PUBLISH for a delivery, or `None` if it exceeds the client's Maximum
    /// Packet Size (then it is dropped for this client only, MQTT-3.1.2-25).
    fn build_publish(
        &mut self,
        d: &Delivery,
        id: Option<crate::codec::PacketId>,
        dup: bool,
        now: Instant,
    ) -> Option<Publish> {
        let qos = match id {
            Some(id) => PublishQoS::with_id(d.qos, id),
            None => PublishQoS::AtMostOnce,
        };
        let mut properties = PublishProperties::default();
        if self.version.is_v5() {
            properties.message = d.msg.properties.clone();
            properties.message.message_expiry_interval = d.msg.remaining_expiry(now);
            properties.subscription_identifiers = d.sub_ids.clone();
        }
        let mut p = Publish {
            dup: dup && qos != PublishQoS::AtMostOnce,
            qos,
            retain: d.retain,
            topic: Some(d.msg.topic.clone()),
            payload: d.msg.payload.clone(),
            properties,
        };
        if codec::publish_len(&p, self.version) > self.client_max_packet {
            METRICS.too_large_dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped(
                self.gate.client().client_id.to_string(),
                d.msg.topic.as_str(),
                DropReason::TooLarge,
            );
            tracing::debug!(topic = %d.msg.topic, "message larger than the client's maximum packet size: dropped");
            return None;
        }
        if let Some(alias_out) = &mut self.alias_out
            && !dup
        {
            match alias_out.by_topic.get(&d.msg.topic) {
                Some(alias) => {
                    p.topic = None;
                    p.properties.topic_alias = Some(*alias);
                }
                None => {
                    let next = u16::try_from(alias_out.by_topic.len() + 1).unwrap_or(u16::MAX);
                    if next <= alias_out.max
                        && let Some(alias) = NonZeroU16::new(next)
                    {
                        alias_out.by_topic.insert(d.msg.topic.clone(), alias);
                        p.properties.topic_alias = Some(alias);
                    }
                }
            }
        }
        Some(p)
    }

    /// Ends the flow of an outbound message at `stage` (PUBACK or PUBCOMP received) and
    /// deletes its durable copy.
    fn complete(&mut self, id: crate::codec::PacketId, stage: Stage) {
        if let Some(i) = self.state.inflight_position(id)
            && self.state.inflight.get(i).is_some_and(|f| f.stage == stage)
            && let Some(f) = self.state.inflight.remove(i)
        {
            self.state.mailbox.forget(&f.delivery);
        }
    }

    /// Stops reading from this publisher until `congested` (a subscriber's queue) has room.
    fn pause_for(&mut self, congested: Option<Arc<crate::mailbox::Mailbox>>) {
        if let Some(mb) = congested
            && self.paused.is_none()
        {
            let timeout = Duration::from_millis(self.broker.config.mqtt.backpressure_timeout_ms);
            self.paused = Some((mb, tokio::time::Instant::now() + timeout));
        }
    }

    /// Acts on one packet from the client. `Some` closes the connection.
    fn handle(&mut self, p: Packet) -> Option<Close> {
        match p {
            Packet::Publish(p) => self.on_publish(p).err().map(Close::Error),
            Packet::PubAck(a) => {
                self.complete(a.packet_id, Stage::AwaitAck);
                None
            }
            Packet::PubRec(a) => {
                let pos = self.state.inflight_position(a.packet_id);
                match pos.and_then(|i| self.state.inflight.get_mut(i).map(|f| (i, f))) {
                    Some((i, f)) if f.stage == Stage::AwaitRec || f.stage == Stage::AwaitComp => {
                        if a.reason.is_error() {
                            // The receiver refused it: the flow ends here (MQTT 5 §4.3.3).
                            if let Some(f) = self.state.inflight.remove(i) {
                                self.state.mailbox.forget(&f.delivery);
                            }
                        } else {
                            f.stage = Stage::AwaitComp;
                            // Remember that PUBREL, not PUBLISH, is owed after a restart,
                            // before the PUBREL goes out: a PUBLISH resent after a restart
                            // that the receiver had already released would be a new
                            // message to it (a duplicate).
                            let mut ticket = None;
                            if let (Some(sid), Some((store, key))) =
                                (f.delivery.store_id, self.state.mailbox.store())
                                && let Ok(bytes) = record::encode_queued(
                                    &f.delivery,
                                    Some((a.packet_id, Stage::AwaitComp)),
                                )
                            {
                                ticket = store.submit_one(Op::PutQueued(key, sid, bytes));
                            }
                            self.send_after(ticket, &Packet::PubRel(Ack::success(a.packet_id)));
                        }
                    }
                    _ => {
                        let mut rel = Ack::success(a.packet_id);
                        if self.version.is_v5() {
                            rel.reason = ReasonCode::PacketIdentifierNotFound;
                        }
                        self.send(&Packet::PubRel(rel));
                    }
                }
                None
            }
            Packet::PubComp(a) => {
                self.complete(a.packet_id, Stage::AwaitComp);
                None
            }
            Packet::PubRel(a) => {
                let mut comp = Ack::success(a.packet_id);
                // PUBCOMP frees the packet id for a new message: it goes out once the id is
                // forgotten on disk too, or a restart would take that new message for a
                // duplicate and drop it.
                let mut ticket = None;
                if self.state.inbound_qos2.remove(&a.packet_id) {
                    if let Some((store, key)) = self.state.mailbox.store() {
                        ticket = store.submit_one(Op::DeleteQos2In(key, a.packet_id.get()));
                    }
                } else if self.version.is_v5() {
                    comp.reason = ReasonCode::PacketIdentifierNotFound;
                }
                self.send_after(ticket, &Packet::PubComp(comp));
                None
            }
            Packet::Subscribe(s) => {
                self.on_subscribe(s);
                None
            }
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                None
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                None
            }
            Packet::Disconnect(d) => Some(self.on_disconnect(d)),
            Packet::Connect(_) => {
                tracing::info!("second CONNECT: protocol error");
                Some(Close::Error(ReasonCode::ProtocolError))
            }
            Packet::Auth(a) => self.on_auth(a).err().map(Close::Error),
            other => {
                tracing::info!(
                    packet = other.name(),
                    "packet a client may not send: protocol error"
                );
                Some(Close::Error(ReasonCode::ProtocolError))
            }
        }
    }

    fn on_publish(&mut self, p: Publish) -> Result<(), ReasonCode> {
        METRICS.publish_received.fetch_add(1, Ordering::Relaxed);
        let cfg = &self.broker.config.mqtt;
        let topic = match (p.topic, p.properties.topic_alias) {
            (topic, Some(alias)) => {
                if alias.get() > cfg.topic_alias_maximum {
                    tracing::info!(alias = alias.get(), "topic alias above our maximum");
                    return Err(ReasonCode::TopicAliasInvalid);
                }
                let slot = usize::from(alias.get() - 1);
                match topic {
                    Some(t) => {
                        if self.alias_in.len() <= slot {
                            self.alias_in.resize(slot + 1, None);
                        }
                        if let Some(s) = self.alias_in.get_mut(slot) {
                            *s = Some(t.clone());
                        }
                        t
                    }
                    None => match self.alias_in.get(slot).cloned().flatten() {
                        Some(t) => t,
                        None => {
                            tracing::info!(alias = alias.get(), "unknown topic alias");
                            return Err(ReasonCode::ProtocolError);
                        }
                    },
                }
            }
            (Some(t), None) => t,
            (None, None) => return Err(ReasonCode::ProtocolError),
        };
        if !p.properties.subscription_identifiers.is_empty() {
            // MQTT-3.3.4-6: only the server sends Subscription Identifiers.
            tracing::info!("PUBLISH from a client with a subscription identifier");
            return Err(ReasonCode::ProtocolError);
        }
        if p.retain && !cfg.retain_available {
            return Err(ReasonCode::RetainNotSupported);
        }
        if !cfg.topic_limits().fits(topic.as_str()) {
            // Not routed. MQTT 5 refuses a QoS 1/2 message with PUBACK / PUBREC 0x90 and
            // keeps the connection; QoS 0 has no acknowledgement, so it gets DISCONNECT
            // 0x90; MQTT 3.x can only be closed.
            tracing::info!(
                len = topic.as_str().len(),
                "topic over the length or level limit"
            );
            let id = match p.qos {
                PublishQoS::AtLeastOnce(id) | PublishQoS::ExactlyOnce(id)
                    if self.version.is_v5() =>
                {
                    id
                }
                _ => return Err(ReasonCode::TopicNameInvalid),
            };
            let mut ack = Ack::success(id);
            ack.reason = ReasonCode::TopicNameInvalid;
            let ack = if matches!(p.qos, PublishQoS::AtLeastOnce(_)) {
                Packet::PubAck(ack)
            } else {
                Packet::PubRec(ack)
            };
            self.send(&ack);
            return Ok(());
        }
        let mut max_qos = QoS::ExactlyOnce;
        if self.gate.active() {
            let action = crate::plugins::Action::Publish;
            match self
                .gate
                .check(action, topic.as_str(), p.qos.qos(), p.retain)
            {
                crate::plugins::Verdict::Allow(q) => max_qos = q.unwrap_or(max_qos),
                crate::plugins::Verdict::Deny(code) => return self.refuse_publish(p.qos, code),
            }
        }
        let draft = Draft {
            topic,
            payload: p.payload,
            qos: p.qos.qos().min(max_qos),
            retain: p.retain,
            properties: p.properties.message,
        };
        if self.broker.plugins.hooks() & crate::plugins::Hooks::TRANSFORM != 0 {
            if let PublishQoS::ExactlyOnce(id) = p.qos
                && self.state.inbound_qos2.contains(&id)
            {
                // A resent QoS 2 message already accepted: answered, not transformed again.
                if let Some(Close::Error(reason)) = self.flush_pending() {
                    return Err(reason);
                }
                return self.accept_publish(None, p.qos);
            }
            // Transformed together with the rest of this read (one plugin call).
            self.pending.push((draft, p.qos));
            if self.pending.len() >= TRANSFORM_BATCH
                && let Some(Close::Error(reason)) = self.flush_pending()
            {
                return Err(reason);
            }
            return Ok(());
        }
        let msg = self.message(draft);
        self.accept_publish(Some(&msg), p.qos)
    }

    /// Routes an accepted message (`None`: accepted and dropped) and acknowledges it.
    fn accept_publish(
        &mut self,
        msg: Option<&Arc<Message>>,
        flow: PublishQoS,
    ) -> Result<(), ReasonCode> {
        let unretained;
        let mut msg = msg;
        let repeat =
            matches!(flow, PublishQoS::ExactlyOnce(id) if self.state.inbound_qos2.contains(&id));
        if let Some(m) = msg
            && m.retain
            && !repeat
            && !self.broker.router.retain_room(m)
        {
            // The retained store is full: MQTT 5 refuses a QoS 1/2 message with 0x97; MQTT
            // 3.x (which cannot refuse one) and QoS 0 have it routed as an ordinary message.
            tracing::info!(topic = %m.topic, "retained store full: message not retained");
            if self.version.is_v5() && flow != PublishQoS::AtMostOnce {
                return self.refuse_publish(flow, ReasonCode::QuotaExceeded.code());
            }
            unretained = Arc::new(m.unretained());
            msg = Some(&unretained);
        }
        if let Some(m) = msg
            && flow != PublishQoS::AtMostOnce
            && !repeat
            && self.broker.store.is_failing()
            && self.needs_store(m, flow)
        {
            // The store cannot write: a message whose acknowledgement promises it is on
            // disk is refused (MQTT 5: 0x97); MQTT 3.x cannot refuse one, so it is left
            // unacknowledged (the client sends it again on its next connection).
            tracing::debug!(topic = %m.topic, "store failing: QoS 1/2 message refused");
            if self.version.is_v5() {
                return self.refuse_publish(flow, ReasonCode::QuotaExceeded.code());
            }
            return Ok(());
        }
        let route = |me: &mut Self| {
            let msg = msg?;
            let routed = me.broker.router.route(msg);
            me.pause_for(routed.congested);
            let plugins = &me.broker.plugins;
            let sunk = if plugins.hooks() & crate::plugins::Hooks::SINK != 0 {
                plugins.sink_offer(&me.gate.client().client_id, msg)
            } else {
                None
            };
            routed.ticket.max(sunk)
        };
        match flow {
            PublishQoS::AtMostOnce => {
                route(self);
            }
            PublishQoS::AtLeastOnce(id) => {
                // PUBACK only once the message is durable in every persistent
                // subscriber's queue (and as retained message).
                let ticket = route(self);
                self.send_after(ticket, &Packet::PubAck(Ack::success(id)));
            }
            PublishQoS::ExactlyOnce(id) => {
                let mut ticket = None;
                if !self.state.inbound_qos2.contains(&id) {
                    let max = self.broker.config.mqtt.receive_maximum;
                    if self.state.inbound_qos2.len() >= usize::from(max) {
                        tracing::info!(
                            "more QoS 2 messages awaiting PUBREL than our Receive Maximum"
                        );
                        return Err(ReasonCode::ReceiveMaximumExceeded);
                    }
                    // The message's queue entries (and retained and sink records) and the
                    // packet id that marks it received commit together: torn apart by a
                    // crash, the client's resend after it would be routed a second time.
                    let group = (self.state.mailbox.store()).map(|(store, _)| store.group());
                    ticket = route(self);
                    self.state.inbound_qos2.insert(id);
                    if let Some((store, key)) = self.state.mailbox.store() {
                        ticket = ticket.max(store.submit_one(Op::PutQos2In(key, id.get())));
                    }
                    drop(group);
                }
                self.send_after(ticket, &Packet::PubRec(Ack::success(id)));
            }
        }
        Ok(())
    }

    /// Whether accepting `msg` would write to the store: it is retained, a persistent
    /// session or a sink takes it, or it is QoS 2 from a persistent session (its packet id
    /// is kept until PUBREL).
    fn needs_store(&self, msg: &Message, flow: PublishQoS) -> bool {
        msg.retain
            || (matches!(flow, PublishQoS::ExactlyOnce(_)) && self.state.mailbox.is_persistent())
            || self.broker.router.reaches_persistent(msg)
            || self.broker.plugins.sink_selects(msg.topic.as_str())
    }

    /// A PUBLISH an authorize plugin refused: MQTT 5 QoS 1/2 get PUBACK / PUBREC with the
    /// plugin's reason code; QoS 0 and MQTT 3.x are acknowledged as usual and dropped, as
    /// 3.x has no way to refuse one message (MQTT-3.3.5-2).
    fn refuse_publish(&mut self, qos: PublishQoS, code: u8) -> Result<(), ReasonCode> {
        tracing::debug!(code, "PUBLISH not authorized: dropped");
        let (id, rec) = match qos {
            PublishQoS::AtMostOnce => return Ok(()),
            PublishQoS::AtLeastOnce(id) => (id, false),
            PublishQoS::ExactlyOnce(id) => (id, true),
        };
        let mut ack = Ack::success(id);
        if self.version.is_v5() {
            ack.reason = ReasonCode::from_u8(code).unwrap_or(ReasonCode::NotAuthorized);
        }
        self.send(&if rec {
            Packet::PubRec(ack)
        } else {
            Packet::PubAck(ack)
        });
        Ok(())
    }

    /// Re-authentication (MQTT 5 §4.12.1): AUTH 0x19 starts it with the authenticate
    /// chain, AUTH 0x18 answers a challenge of the plugin that asked. Success is answered
    /// with AUTH 0x00; a refusal disconnects.
    fn on_auth(&mut self, a: crate::codec::Auth) -> Result<(), ReasonCode> {
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

    fn on_subscribe(&mut self, s: Subscribe) {
        let id = s.properties.subscription_identifier;
        let sub = self.state.subscriber();
        let n = s.filters.len();
        // A filter repeated in one packet takes effect once, as its last occurrence (as if
        // the occurrences came one packet after the other); every occurrence is answered
        // with that one's code.
        let effective: Vec<usize> = {
            let mut last: HashMap<&str, usize> = HashMap::with_capacity(n);
            for (i, (f, _)) in s.filters.iter().enumerate() {
                last.insert(f.as_str(), i);
            }
            (s.filters.iter())
                .enumerate()
                .map(|(i, (f, _))| last.get(f.as_str()).copied().unwrap_or(i))
                .collect()
        };
        let mut reasons = vec![ReasonCode::UnspecifiedError; n];
        let mut retained = Vec::new();
        // Retained messages are collected only while the session's queue has room for them.
        let (mut room, mut room_bytes) = self.state.mailbox.room();
        let now = Instant::now();
        let cfg = &self.broker.config.mqtt;
        let (max_subs, max_len, max_levels) = (
            cfg.max_subscriptions,
            cfg.max_topic_length,
            cfg.max_topic_levels,
        );
        let verdicts = if self.gate.checks_subscriptions() {
            let asked: Vec<_> = (s.filters.iter()).map(|(f, o)| (f, o.qos)).collect();
            self.gate.check_subscriptions(&asked)
        } else {
            Vec::new()
        };
        // Each changed subscription is one small row; nothing is written when nothing
        // changed.
        let mut ticket = None;
        for (i, (filter, mut options)) in s.filters.into_iter().enumerate() {
            if effective.get(i) != Some(&i) {
                continue;
            }
            let reason = match verdicts.get(i) {
                Some(crate::plugins::Verdict::Deny(code)) => {
                    ReasonCode::from_u8(*code).unwrap_or(ReasonCode::NotAuthorized)
                }
                verdict => {
                    if let Some(crate::plugins::Verdict::Allow(Some(q))) = verdict {
                        options.qos = options.qos.min(*q);
                    }
                    if filter.as_str().len() > max_len
                        || filter.filter().split('/').count() > max_levels
                    {
                        tracing::info!(
                            len = filter.as_str().len(),
                            "topic filter over the length or level limit"
                        );
                        ReasonCode::TopicFilterInvalid
                    } else if self.state.subscriptions.len() >= max_subs
                        && !self.state.subscriptions.contains_key(&filter)
                    {
                        tracing::info!(max_subs, "subscription limit reached");
                        ReasonCode::QuotaExceeded
                    } else {
                        let is_new = self.broker.router.subscribe(&sub, &filter, options, id);
                        let subscription = Subscription { options, id };
                        let old = self
                            .state
                            .subscriptions
                            .insert(filter.clone(), subscription);
                        if old != Some(subscription) {
                            let sessions = &self.broker.sessions;
                            let t = sessions.save_subscription(
                                &self.state,
                                &filter,
                                Some(subscription),
                            );
                            ticket = ticket.max(t);
                        }
                        if self.broker.plugins.wants_events() {
                            self.broker.plugins.emit(Event::Subscribed {
                                client: self.gate.client().clone(),
                                filter: filter.as_str().to_owned(),
                                qos: options.qos,
                            });
                        }
                        // Retained messages are never sent for shared subscriptions (MQTT 5
                        // §4.8.2).
                        let send_retained = filter.share_group().is_none()
                            && match options.retain_handling {
                                codec::RetainHandling::SendAtSubscribe => true,
                                codec::RetainHandling::SendIfNew => is_new,
                                codec::RetainHandling::DoNotSend => false,
                            };
                        if send_retained {
                            self.broker
                                .router
                                .for_each_retained(filter.filter(), now, |m| {
                                    let size = m.size();
                                    if room == 0 || size > room_bytes {
                                        return false;
                                    }
                                    room -= 1;
                                    room_bytes -= size;
                                    retained.push(Delivery {
                                        qos: m.qos.min(options.qos),
                                        msg: m.clone(),
                                        retain: true,
                                        sub_ids: id.into_iter().collect(),
                                        shared: None,
                                        store_id: None,
                                        hooked: false,
                                    });
                                    true
                                });
                        }
                        ReasonCode::granted(options.qos)
                    }
                }
            };
            if let Some(r) = reasons.get_mut(i) {
                *r = reason;
            }
        }
        for (i, &e) in effective.iter().enumerate() {
            if e != i
                && let Some(&r) = reasons.get(e)
                && let Some(slot) = reasons.get_mut(i)
            {
                *slot = r;
            }
        }
        self.send_after(
            ticket,
            &Packet::SubAck(SubAck {
                packet_id: s.packet_id,
                reasons,
                properties: Default::default(),
            }),
        );
        if self.gate.active() && !retained.is_empty() {
            retained = self.authorize_retained(retained);
        }
        for d in retained {
            if self.state.mailbox.push(d).is_err() {
                break;
            }
        }
    }

    /// Keeps the retained messages the authorize hook lets this client receive.
    fn authorize_retained(&mut self, retained: Vec<Delivery>) -> Vec<Delivery> {
        let requests: Vec<_> = retained
            .iter()
            .map(|d| crate::plugins::Request {
                action: crate::plugins::Action::Retained,
                topic: d.msg.topic.as_str(),
                qos: d.qos,
                retain: true,
            })
            .collect();
        let verdicts = self.gate.check_many(&requests);
        drop(requests);
        retained
            .into_iter()
            .zip(verdicts)
            .filter_map(|(mut d, v)| match v {
                crate::plugins::Verdict::Allow(q) => {
                    d.qos = d.qos.min(q.unwrap_or(QoS::ExactlyOnce));
                    Some(d)
                }
                crate::plugins::Verdict::Deny(_) => {
                    tracing::debug!(topic = %d.msg.topic.as_str(), "retained message not authorized");
                    None
                }
            })
            .collect()
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        let mut ticket = None;
        for filter in u.filters {
            let existed = self.state.subscriptions.remove(&filter).is_some();
            if existed {
                self.broker.router.unsubscribe(self.state.key, &filter);
                let t = self
                    .broker
                    .sessions
                    .save_subscription(&self.state, &filter, None);
                ticket = ticket.max(t);
            }
            if existed && self.broker.plugins.wants_events() {
                self.broker.plugins.emit(Event::Unsubscribed {
                    client: self.gate.client().clone(),
                    filter: filter.as_str().to_owned(),
                });
            }
            reasons.push(if existed {
                ReasonCode::Success
            } else {
                ReasonCode::NoSubscriptionExisted
            });
        }
        self.send_after(
            ticket,
            &Packet::UnsubAck(UnsubAck {
                packet_id: u.packet_id,
                reasons,
                properties: Default::default(),
            }),
        );
    }

    fn on_disconnect(&mut self, d: Disconnect) -> Close {
        if let Some(e) = d.properties.session_expiry_interval {
            if self.connect_expiry == 0 && e != 0 {
                // MQTT-3.14.2-2: a session that was to end with the connection cannot be
                // made persistent at DISCONNECT.
                return Close::Error(ReasonCode::ProtocolError);
            }
            self.state.expiry = e.min(self.broker.config.mqtt.max_session_expiry);
        }
        if d.reason == ReasonCode::Success {
            Close::Normal
        } else {
            Close::ClientWithWill
        }
    }
}

/// Waits until the congested subscriber has room (true) or the deadline passes (false).
async fn wait_for_room(
    paused: &Option<(Arc<crate::mailbox::Mailbox>, tokio::time::Instant)>,
) -> bool {
    match paused {
        Some((mb, deadline)) => tokio::time::timeout_at(*deadline, mb.wait_for_room())
            .await
            .is_ok(),
        None => std::future::pending().await,
    }
}

/// A client identifier for a client that sent none: unique within this process and unlikely
/// to collide with ids clients choose.
fn assign_client_id() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let salt = RandomState::new().hash_one(n);
    format!("sandpiper-{salt:016x}{n:x}")
}

#[cfg(test)]
mod task_size {
    /// The size of what `f` returns (an async fn's future), without calling it.
    fn future_size<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection's task holds `run`'s future for as long as the client stays, so
    /// its size is a floor of the memory per idle connection. It is the largest state
    /// across its awaits: what only CONNECT handling, a refusal or the close need is
    /// boxed. A change that grows it past this bound grows every connection: box the part
    /// that does, or raise the bound knowingly.
    #[test]
    fn an_idle_connection_task_stays_small() {
        use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
        let size = future_size(super::run::<OwnedReadHalf, OwnedWriteHalf>);
        assert!(size <= 1856, "connection::run's future is {size} bytes");
    }
}
