//! One task per client connection: read → decode → act on the session → route; drain the
//! session's mailbox → encode → write. Reads and writes are multiplexed in one `select!` so a
//! client that does not read cannot stall us reading its acks, and a client that floods us
//! cannot make us buffer without bound (reading stops while our write buffer is full).
//!
//! `run` (here) takes a socket from CONNECT to close; `handshake` reads CONNECT and answers
//! it; `socket` is the read/write loop; `publish`, `subscribe` and `deliver` handle the
//! packets of each flow.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::broker::Broker;
use crate::codec::{Disconnect, Packet, ProtocolVersion, PublishQoS, ReasonCode};
use crate::message::Delivery;
use crate::message::Draft;
use crate::session::{InboundAliases, OutboundAliases, PendingWill};
use handshake::ReadError;
use handshake::read_connect;
use handshake::refuse_connect;
use socket::Served;

mod deliver;
mod handshake;
pub mod keepalive;
mod out;
pub(crate) mod park;
mod publish;
mod socket;
mod subscribe;

pub(crate) use handshake::send_connack_and_close;

/// Facts about the listener a connection came through (and, for TLS, about the client's
/// certificate: the future authenticate hook gets them from here).
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// Listener name, for logs and plugins.
    pub name: Arc<str>,
    /// The principal of its anonymous clients (the listener's name, no user), shared by
    /// them all.
    pub anonymous: Arc<crate::message::Principal>,
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
    /// Cancelled when the listener closes (a reload removed or changed it) or the broker
    /// stops: its connections then close (MQTT 5: DISCONNECT 0x8B).
    pub stop: tokio_util::sync::CancellationToken,
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
/// Smallest and largest read buffer reservation. An idle connection keeps the small one
/// (memory per idle client is what limits how many a broker holds); a busy one doubles it
/// while reads fill it.
const MIN_READ: usize = 64;
const MAX_READ: usize = 64 * 1024;
/// How long a closing connection tries to flush its last packets.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

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
    /// An operator disconnected the client (the admin API).
    Admin,
    /// The broker is shutting down.
    Shutdown,
}

impl Close {
    /// Whether the broker ends the connection while the client may still be sending:
    /// after a protocol error or a takeover (not after the client's DISCONNECT or close,
    /// a keep-alive timeout, when the client sent nothing for a while, or at shutdown,
    /// which should not wait for clients).
    fn broker_first(self) -> bool {
        matches!(self, Close::Error(_) | Close::TakenOver | Close::Admin)
    }

    /// The DISCONNECT reason sent to an MQTT 5 client, if one is sent.
    fn reason(self) -> Option<ReasonCode> {
        match self {
            Close::Error(r) => Some(r),
            Close::KeepAlive => Some(ReasonCode::KeepAliveTimeout),
            Close::TakenOver => Some(ReasonCode::SessionTakenOver),
            Close::Admin => Some(ReasonCode::AdministrativeAction),
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
/// (A plain TCP client is served by [`run_tcp`], which parks it while idle.)
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
    // Connecting (CONNECT, authentication plugins, session takeover, a refusal and its
    // linger) and finishing are boxed, as the main loop is: the task keeps the largest
    // state of its awaits for as long as the client stays, and an idle client should keep
    // only the idle wait's.
    let Some((mut conn, inbuf)) =
        Box::pin(connect(&broker, &listener, peer, &mut rd, &mut wr)).await
    else {
        return;
    };
    let open = crate::metrics::open(&listener.name, conn.version);
    conn.inbuf = inbuf;
    // The main loop's state (its select, timer and buffers) is boxed and dropped while the
    // connection is idle; what the task keeps for an idle client is the idle wait's. (The
    // read buffer and the time of the last read live in `Conn` for the same reason.)
    let close = loop {
        match Box::pin(conn.serve_boxed(&mut rd, &mut wr, &listener.stop)).await {
            Served::Closed(close) => break close,
            Served::Idle => {
                if let Some(close) = conn.idle(&mut rd, &listener.stop).await {
                    break close;
                }
            }
        }
    };
    Box::pin(end(conn, close, &listener, open, &mut rd, &mut wr)).await;
}

/// Serves a plain TCP client until it disconnects, fails, is taken over, or the broker
/// stops. While it is idle it has no task ([`park`]).
pub(crate) async fn run_tcp(
    broker: Arc<Broker>,
    listener: Arc<ListenerInfo>,
    peer: SocketAddr,
    socket: tokio::net::TcpStream,
    permit: crate::listener::Permit,
) {
    let (mut rd, mut wr) = socket.into_split();
    let Some((mut conn, inbuf)) =
        Box::pin(connect(&broker, &listener, peer, &mut rd, &mut wr)).await
    else {
        return;
    };
    let open = crate::metrics::open(&listener.name, conn.version);
    conn.inbuf = inbuf;
    let tcp = park::Tcp {
        conn,
        listener,
        open,
        _permit: permit,
    };
    serve_tcp(tcp, rd, wr).await;
}

/// The task of a parked connection woken again (its socket back in tokio's reactor).
async fn resume(tcp: park::Tcp<Resting>, socket: std::net::TcpStream) {
    use tracing::Instrument;
    let tcp = tcp.map(Resting::wake);
    let peer = socket
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let span = tracing::info_span!("conn", %peer, client_id = %tcp.conn.state.client_id);
    async move {
        match tokio::net::TcpStream::from_std(socket) {
            Ok(socket) => {
                let (rd, wr) = socket.into_split();
                serve_tcp(tcp, rd, wr).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve a parked connection again");
                tcp.end_without_socket().await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// The main loop of a plain TCP connection; parks it when it has nothing to do.
async fn serve_tcp(
    mut tcp: park::Tcp,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
) {
    let close = loop {
        let served = Box::pin(tcp.conn.serve_boxed(&mut rd, &mut wr, &tcp.listener.stop)).await;
        match served {
            Served::Closed(close) => break close,
            Served::Idle => {
                if let Some(close) = tcp.conn.watch_keep_alive() {
                    break close;
                }
                match park::park_tcp(tcp, rd, wr) {
                    park::Parking::Parked => return,
                    park::Parking::Kept(t, r, w) => {
                        (tcp, rd, wr) = (t, r, w);
                        if let Some(close) = tcp.conn.idle(&mut rd, &tcp.listener.stop).await {
                            break close;
                        }
                    }
                    park::Parking::Lost(t) => return t.end_without_socket().await,
                }
            }
        }
    };
    tcp.end(close, &mut rd, &mut wr).await;
}

impl park::Tcp {
    /// Ends the connection (see [`end`]); its permit is given back after.
    async fn end<R, W>(self, close: Close, rd: &mut R, wr: &mut W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let park::Tcp {
            conn,
            listener,
            open,
            _permit,
        } = self;
        Box::pin(end(conn, close, &listener, open, rd, wr)).await;
    }

    /// Ends a connection whose socket is gone (it could not move between tokio's reactor
    /// and the park): the session goes back to the registry, nothing is written.
    async fn end_without_socket(self) {
        let (mut rd, mut wr) = (tokio::io::empty(), tokio::io::sink());
        self.end(Close::Lost, &mut rd, &mut wr).await;
    }
}

/// Ends a connection: counts and logs why, sends its last words, gives its session back,
/// and lingers if the broker closed first.
async fn end<R, W>(
    conn: Box<Conn>,
    close: Close,
    listener: &ListenerInfo,
    open: crate::metrics::OpenConnection,
    rd: &mut R,
    wr: &mut W,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if close == Close::KeepAlive {
        crate::metrics::inc(crate::metrics::C::KeepAliveTimeouts);
    }
    // The reason code sent with DISCONNECT to an MQTT 5 client, if the broker sent one.
    let code = close.reason().map(|r| format!("0x{:02X}", r as u8));
    tracing::info!(
        listener = %listener.name,
        protocol = %conn.version,
        reason = ?close,
        code = code.as_deref().unwrap_or(""),
        "client disconnected"
    );
    drop(open);
    (*conn).finish(close, wr).await;
    if close.broker_first() {
        linger(rd, &listener.stop).await;
    }
}

/// Reads CONNECT and answers it: the client's connection, with what was read behind
/// CONNECT, or `None` when it is refused, fails or the listener stops.
async fn connect<R, W>(
    broker: &Arc<Broker>,
    listener: &Arc<ListenerInfo>,
    peer: SocketAddr,
    rd: &mut R,
    wr: &mut W,
) -> Option<(Box<Conn>, BytesMut)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The configuration in force when the client came (a reload applies to later ones).
    let (connect_timeout, limits) = {
        let config = broker.current();
        (config.mqtt.connect_timeout, config.mqtt.connect_limits())
    };
    let mut inbuf = BytesMut::with_capacity(MIN_READ);
    let deadline = Duration::from_secs(connect_timeout);
    let first = tokio::select! {
        _ = listener.stop.cancelled() => return None,
        r = tokio::time::timeout(deadline, read_connect(rd, &mut inbuf, limits)) => r,
    };
    let connect = match first {
        Err(_) => {
            tracing::info!("no CONNECT within {}s: closing", connect_timeout);
            return None;
        }
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return None,
        Ok(Err(ReadError::Io(e))) => {
            tracing::debug!(error = %e, "read failed before CONNECT");
            return None;
        }
        Ok(Err(ReadError::Decode(e))) => {
            tracing::info!(error = %e.error, "bad CONNECT: closing");
            refuse_connect(wr, &e).await;
            linger(rd, &listener.stop).await;
            return None;
        }
    };
    tracing::trace!(%peer, "CONNECT received");
    let conn = Conn::accept(broker, listener, peer, *connect, (&mut *rd, &mut inbuf), wr).await;
    let Some(conn) = conn else {
        // Refused (CONNACK with a reason code sent) or failed.
        linger(rd, &listener.stop).await;
        return None;
    };
    Some((Box::new(conn), inbuf))
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
pub(crate) async fn linger<R: AsyncRead + Unpin>(
    rd: &mut R,
    stop: &tokio_util::sync::CancellationToken,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut left = LINGER_BYTES;
    let read = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    });
    // A listener stopping (shutdown, a reload removing it) does not wait for its clients.
    tokio::select! {
        _ = read => {}
        () = stop.cancelled() => {}
    }
}

/// A connected client.
struct Conn {
    broker: Arc<Broker>,
    /// The configuration in force when the client connected: its limits hold for the
    /// connection's life (its CONNACK announced some of them).
    config: Arc<crate::config::Config>,
    version: ProtocolVersion,
    state: crate::session::SessionState,
    conn_id: u64,
    /// A message this connection published since the last read was queued for a session
    /// (whose connection may want to run before our acknowledgements go out).
    handed_on: bool,
    /// Read from the client, not handled yet (empty, without an allocation, while idle).
    inbuf: BytesMut,
    /// When the client last sent something (its keep alive counts from there).
    last_rx: tokio::time::Instant,
    /// The keep-alive tick the broker's watch wakes this connection in (0: none asked);
    /// the deadline only moves later, so one pending wake-up is enough.
    ka_watch: u64,
    out: out::Out,
    batch: VecDeque<Delivery>,
    /// Outbound inflight window: min(client Receive Maximum, max_inflight).
    window: u16,
    /// The client's Maximum Packet Size.
    client_max_packet: usize,
    /// Topic aliases the client defined.
    alias_in: InboundAliases,
    /// Topic aliases we define toward the client, if it allows any. Boxed, as are the
    /// will and the re-authentication state: most clients use none of them, and every
    /// byte here is kept by every idle connection.
    alias_out: Option<Box<OutboundAliases>>,
    will: Option<Box<PendingWill>>,
    /// 1.5 × the keep alive in force, in milliseconds (MQTT-3.1.2-24); 0: none.
    keep_alive_ms: u32,
    /// Packets waiting for tickets to be durable, in send order.
    held: VecDeque<(Ticket, BytesMut)>,
    /// The highest durable store ticket.
    committed: tokio::sync::watch::Receiver<u64>,
    /// The highest ticket of the cluster's messages for other nodes that JetStream holds
    /// (a cluster node only).
    replicated: Option<tokio::sync::watch::Receiver<u64>>,
    /// Queued messages are on disk but not yet readable: fill again after the next commit.
    waiting_for_store: bool,
    /// Decoding stopped (a congested subscriber, too many held acknowledgements) with
    /// packets possibly left in the read buffer: decode again once that has passed.
    input_stopped: bool,
    /// A subscriber of ours is congested: reading stops until it has room, or until the
    /// deadline, after which it is marked slow.
    /// Boxed: rare, and every byte here is kept by every idle connection.
    paused: Option<Box<Pause>>,
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
    /// The client is another broker's bridge (MQTT 3.x, the protocol level's 0x80 bit):
    /// its subscriptions take No Local and Retain As Published, so nothing it publishes
    /// comes back to it and retained flags pass as they are.
    bridge: bool,
}

/// A parked connection's [`Conn`] without what only a served connection uses (its
/// buffers and queues, empty when it parks, the back-pressure pause and the store's
/// commit watch), and the rest kept compactly: what few clients use in one box, times and
/// limits in 4 or 8 bytes, the plugin gate without what the session and the broker have.
/// Every idle client keeps one.
struct Resting {
    broker: Arc<Broker>,
    config: Arc<crate::config::Config>,
    state: crate::session::SessionState,
    conn_id: u64,
    /// When the client last sent something, in nanoseconds after [`epoch`].
    last_rx: u64,
    alias_in: InboundAliases,
    will: Option<Box<PendingWill>>,
    gate: crate::plugins::gate::RestingGate,
    /// What few clients have: outbound topic aliases, re-authentication, attributes
    /// authentication set (`None` when all are empty).
    rare: Option<Box<Rare>>,
    /// The keep-alive watch's tick (0: none asked, or past `u32::MAX`: then a wake-up asks
    /// again, and the watch wakes the connection twice).
    ka_watch: u32,
    /// The client's Maximum Packet Size (`u32::MAX`: none, which no packet reaches).
    client_max_packet: u32,
    keep_alive_ms: u32,
    connect_expiry: u32,
    window: u16,
    version: ProtocolVersion,
    revoked: bool,
    bridge: bool,
}

/// What a parked connection keeps in a box of its own, when it has any of it.
struct Rare {
    alias_out: Option<Box<OutboundAliases>>,
    reauth: Option<Box<Reauth>>,
    attributes: Box<[(String, String)]>,
}

/// The instant parked connections count their last read from: set when the first broker
/// starts ([`crate::broker::Broker::new`]), so that it precedes every connection's.
pub(crate) fn epoch() -> tokio::time::Instant {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(tokio::time::Instant::now)
}

/// `at` as a parked connection keeps it: nanoseconds after [`epoch`] (an instant before it
/// counts as the epoch).
fn since_epoch(at: tokio::time::Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// A client's Maximum Packet Size as a parked connection keeps it (`usize::MAX`, none,
/// as `u32::MAX`: no packet is that long), and back.
fn packet_limit_to_u32(limit: usize) -> u32 {
    u32::try_from(limit).unwrap_or(u32::MAX)
}

fn packet_limit_from_u32(limit: u32) -> usize {
    match limit {
        u32::MAX => usize::MAX,
        m => usize::try_from(m).unwrap_or(usize::MAX),
    }
}

impl Conn {
    /// The connection as it rests while parked; what it drops is empty when it has
    /// nothing to do ([`Conn::quiet`]).
    fn rest(self: Box<Conn>) -> Resting {
        let c = *self;
        debug_assert!(c.inbuf.is_empty() && c.out.is_empty() && c.held.is_empty());
        debug_assert!(c.batch.is_empty() && c.pending.is_empty() && c.paused.is_none());
        let (gate, attributes) = c.gate.rest();
        let rare =
            (c.alias_out.is_some() || c.reauth.is_some() || !attributes.is_empty()).then(|| {
                Box::new(Rare {
                    alias_out: c.alias_out,
                    reauth: c.reauth,
                    attributes,
                })
            });
        Resting {
            broker: c.broker,
            config: c.config,
            state: c.state,
            conn_id: c.conn_id,
            last_rx: since_epoch(c.last_rx),
            alias_in: c.alias_in,
            will: c.will,
            gate,
            rare,
            ka_watch: u32::try_from(c.ka_watch).unwrap_or(0),
            client_max_packet: packet_limit_to_u32(c.client_max_packet),
            keep_alive_ms: c.keep_alive_ms,
            connect_expiry: c.connect_expiry,
            window: c.window,
            version: c.version,
            revoked: c.revoked,
            bridge: c.bridge,
        }
    }
}

/// What a held packet waits for: a store ticket and a cluster ticket (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ticket {
    /// The store's ticket (`Store::committed`).
    pub store: u64,
    /// The cluster's ticket (`Cluster::replicated`).
    pub replicated: u64,
}

impl Ticket {
    /// A wait for the store only.
    pub fn store(t: Option<u64>) -> Ticket {
        Ticket {
            store: t.unwrap_or(0),
            replicated: 0,
        }
    }

    /// A wait for what `routed` wrote: the store and the cluster.
    pub fn routed(routed: &crate::router::Routed) -> Ticket {
        Ticket {
            store: routed.ticket.unwrap_or(0),
            replicated: routed.replicated.unwrap_or(0),
        }
    }

    /// Both waits: the later of each.
    pub fn max(self, other: Ticket) -> Ticket {
        Ticket {
            store: self.store.max(other.store),
            replicated: self.replicated.max(other.replicated),
        }
    }
}

impl Resting {
    /// The connection served again.
    fn wake(self) -> Box<Conn> {
        let r = self;
        let (alias_out, reauth, attributes) = match r.rare {
            Some(rare) => (rare.alias_out, rare.reauth, rare.attributes),
            None => (None, None, Box::default()),
        };
        let gate = (r.gate).wake(
            r.broker.plugins.clone(),
            r.state.client_id.clone(),
            attributes,
        );
        Box::new(Conn {
            committed: r.broker.store.committed(),
            replicated: r.broker.cluster.as_ref().map(|c| c.replicated()),
            broker: r.broker,
            config: r.config,
            version: r.version,
            state: r.state,
            conn_id: r.conn_id,
            handed_on: false,
            inbuf: BytesMut::new(),
            last_rx: epoch() + Duration::from_nanos(r.last_rx),
            ka_watch: u64::from(r.ka_watch),
            out: out::Out::default(),
            batch: VecDeque::new(),
            window: r.window,
            client_max_packet: packet_limit_from_u32(r.client_max_packet),
            alias_in: r.alias_in,
            alias_out,
            will: r.will,
            keep_alive_ms: r.keep_alive_ms,
            held: VecDeque::new(),
            waiting_for_store: false,
            input_stopped: false,
            paused: None,
            connect_expiry: r.connect_expiry,
            gate,
            pending: Vec::new(),
            reauth,
            revoked: r.revoked,
            bridge: r.bridge,
        })
    }
}

/// A congested queue a connection waits for, and until when.
type Pause = (Arc<dyn crate::mailbox::Room>, tokio::time::Instant);

/// What re-authentication needs (MQTT 5 §4.12.1).
struct Reauth {
    /// What the client's CONNECT said.
    connect: crate::plugins::ConnectInfo,
    /// An exchange in progress: the plugin and its state.
    step: Option<(Arc<crate::plugins::Plugin>, Vec<u8>)>,
}

impl Conn {
    /// Answers what the admin API asked about this connection's session, if anything.
    fn answer_questions(&mut self) {
        let asks = self.state.mailbox.questions();
        if asks.is_empty() {
            return;
        }
        let view = crate::mailbox::Inspection {
            subscriptions: (self.state.subscriptions.iter())
                .map(|(f, s)| (f.clone(), s.options, s.id))
                .collect(),
            inflight: self.state.flows.in_flight(),
        };
        for tx in asks {
            let _ = tx.send(view.clone());
        }
    }

    /// Acts on one packet from the client. `Some` closes the connection.
    fn handle(&mut self, p: Packet) -> Option<Close> {
        match p {
            Packet::Publish(p) => self.on_publish(p).err().map(Close::Error),
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) | Packet::PubRel(_) => {
                let v5 = self.version.is_v5();
                if let Some(reply) = self.state.acknowledged(&p, v5)
                    && let Some(packet) = reply.packet
                {
                    self.send_after(reply.after, &packet);
                }
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

    fn on_disconnect(&mut self, d: Disconnect) -> Close {
        if let Some(e) = d.properties.session_expiry_interval {
            if self.connect_expiry == 0 && e != 0 {
                // MQTT-3.14.2-2: a session that was to end with the connection cannot be
                // made persistent at DISCONNECT.
                return Close::Error(ReasonCode::ProtocolError);
            }
            self.state.expiry = e.min(self.config.mqtt.max_session_expiry);
        }
        if d.reason == ReasonCode::Success {
            Close::Normal
        } else {
            Close::ClientWithWill
        }
    }
}

#[cfg(test)]
mod task_size {
    /// The size of what `f` returns (an async fn's future), without calling it.
    fn future_size<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A plain TCP connection's task is `run`'s future for as long as the client stays, so
    /// its size is a floor of the memory per idle connection. It is the largest state
    /// across its awaits: connecting, the main loop and the close are boxed, so what is
    /// left is the idle wait and `run`'s own locals. A change that grows it past this
    /// bound grows every connection: box the part that does, or raise the bound knowingly.
    #[test]
    fn an_idle_connection_task_stays_small() {
        use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
        let size = future_size(super::run::<OwnedReadHalf, OwnedWriteHalf>);
        assert!(size <= 416, "connection::run's future is {size} bytes");
    }

    /// A parked connection's compact last-read time and packet limit come back as they were.
    #[test]
    fn a_parked_connections_times_and_limits_come_back_whole() {
        use std::time::Duration;
        let epoch = super::epoch();
        for after in [0, 1, 999_999_999, 86_400 * 1_000_000_007] {
            let at = epoch + Duration::from_nanos(after);
            assert_eq!(epoch + Duration::from_nanos(super::since_epoch(at)), at);
        }
        for limit in [0, 1, 268_435_460, u32::MAX as usize - 1, usize::MAX] {
            let kept = super::packet_limit_to_u32(limit);
            assert_eq!(super::packet_limit_from_u32(kept), limit);
        }
        // A limit of u32::MAX bytes comes back as none: no packet reaches either.
        assert_eq!(super::packet_limit_from_u32(u32::MAX), usize::MAX);
    }

    /// What a parked connection keeps of its state: every idle plain TCP client holds one.
    #[test]
    fn a_resting_connection_stays_small() {
        let size = std::mem::size_of::<super::Resting>();
        assert!(size <= 208, "Resting is {size} bytes");
    }
}
