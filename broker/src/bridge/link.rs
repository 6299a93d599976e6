//! A bridge's connection to its remote broker: connect (TCP or TLS, CONNECT, CONNACK),
//! subscribe to the inbound topics, then one loop that reads the remote's packets, sends
//! the outbound queue as the window allows, holds acknowledgements until what they
//! acknowledge is durable, and keeps the connection alive. A lost or refused connection is
//! tried again after an exponential back-off with jitter (`reconnect_min_ms` ..
//! `reconnect_max_ms`). Whatever the remote does (refuses, sends garbage, never answers)
//! costs only this task: every wait has a deadline, every packet is decoded within the
//! broker's limits.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::outbox::{Acked, Outbox, Step, packet_id};
use super::{Bridge, RELEASED};
use crate::codec::{
    Ack, ConnAck, Connect, ConnectProperties, Disconnect, Packet, PacketId, ProtocolVersion,
    Publish, PublishProperties, PublishQoS, QoS, ReasonCode, RetainHandling, Subscribe,
    SubscribeProperties, SubscriptionOptions, TopicFilter, TopicName, decode_packet, encode_packet,
    publish_len,
};
use crate::config::BridgeProtocol;
use crate::message::Draft;
use crate::pipeline::{Origin, Pipeline};
use crate::store::Store;

/// What a bridge's connection is: a TCP or TLS stream.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The store key of a bridge's inbound QoS 2 identifiers.
const QOS2_KEY: &str = "qos2-received";

/// Inbound QoS 2 identifiers awaiting PUBREL, each with the store ticket of its routing
/// (known for those routed in this process): a resend's PUBREC waits for it too.
type Received = HashMap<u16, Option<u64>>;

/// Why a connection ended.
enum Ended {
    /// The broker is shutting down.
    Shutdown,
    /// Lost, with the reason.
    Lost(String),
}

/// Runs bridge `b` until `shutdown`.
pub(super) async fn run(
    b: Arc<Bridge>,
    pipeline: Arc<Pipeline>,
    store: Arc<Store>,
    max_packet_size: u32,
    shutdown: CancellationToken,
) {
    let c = &b.config;
    let min = Duration::from_millis(c.reconnect_min_ms);
    let max = Duration::from_millis(c.reconnect_max_ms);
    let mut delay = min;
    let ns: Arc<str> = format!("bridge/{}", c.name).into();
    let mut received: Received = match store.kv_get(&ns, QOS2_KEY) {
        Ok(Some(v)) => (v.chunks_exact(2))
            .map(|p| (u16::from_be_bytes([p[0], p[1]]), None))
            .collect(),
        Ok(None) => HashMap::new(),
        Err(e) => {
            tracing::error!(bridge = %c.name, error = %e, "bridge state unreadable");
            HashMap::new()
        }
    };
    let mut outbox = Outbox::new(b.fifo.first());
    loop {
        let attempt = tokio::select! {
            r = connect(&b, max_packet_size) => r,
            () = shutdown.cancelled() => return,
        };
        match attempt {
            Ok(Connected {
                io,
                connack,
                version,
                rest,
            }) => {
                delay = min;
                b.stalled.store(false, Ordering::Release);
                b.stats.connected.store(true, Ordering::Relaxed);
                tracing::info!(bridge = %c.name, address = %c.address, session_present = connack.session_present,
                    "bridge connected");
                if !connack.session_present && !received.is_empty() {
                    // A new session at the remote: the identifiers it held are gone
                    // (MQTT-4.1.0-1), and its new messages may use them again.
                    received.clear();
                    store.kv_set(&ns, QOS2_KEY, Vec::new());
                }
                let mut link = Link::new(
                    &b,
                    &pipeline,
                    &store,
                    &ns,
                    version,
                    &connack,
                    max_packet_size,
                );
                let ended = link
                    .serve(io, rest, &mut outbox, &mut received, &shutdown)
                    .await;
                b.stats.connected.store(false, Ordering::Relaxed);
                b.lock_qos0().clear();
                consume(&b, &outbox);
                // Disconnected, it holds nobody back.
                b.made_room();
                match ended {
                    Ended::Shutdown => return,
                    Ended::Lost(why) => {
                        tracing::warn!(bridge = %c.name, reason = %why, "bridge connection lost");
                    }
                }
            }
            Err(why) => {
                tracing::warn!(bridge = %c.name, address = %c.address, reason = %why,
                    retry_in_ms = delay.as_millis() as u64, "bridge cannot connect");
            }
        }
        b.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(jitter(delay)) => {}
            () = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(max);
    }
}

/// Between half and all of `d`, at random.
fn jitter(d: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let half = d / 2;
    let ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
    half + Duration::from_millis(r % ms)
}

/// Opens the connection: TCP, TLS for `mqtts`, CONNECT and the remote's CONNACK, each
/// within `connect_timeout`.
async fn connect(b: &Bridge, max_packet_size: u32) -> Result<Connected, String> {
    let c = &b.config;
    let remote = c.remote().ok_or("invalid address")?;
    let deadline = Duration::from_secs(c.connect_timeout);
    let within =
        |what: &'static str| move |_| format!("{what}: no answer within {}s", deadline.as_secs());
    let tcp = tokio::time::timeout(
        deadline,
        TcpStream::connect((remote.host.as_str(), remote.port)),
    )
    .await
    .map_err(within("TCP connect"))?
    .map_err(|e| format!("TCP connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut io: Box<dyn Io> = if remote.tls {
        let ca = (c.ca.clone()).unwrap_or_else(|| crate::transport::tls::SYSTEM_CA_BUNDLE.into());
        let identity = c.cert.as_deref().zip(c.key.as_deref());
        let config =
            crate::transport::tls::client_config(&ca, identity).map_err(|e| format!("TLS: {e}"))?;
        let name = c.server_name.clone().unwrap_or_else(|| remote.host.clone());
        let name = rustls_pki_types::ServerName::try_from(name)
            .map_err(|e| format!("TLS server name: {e}"))?;
        let tls = tokio::time::timeout(
            deadline,
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(within("TLS handshake"))?
        .map_err(|e| format!("TLS handshake: {e}"))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let version = match c.protocol {
        BridgeProtocol::V5 => ProtocolVersion::V5,
        BridgeProtocol::V3_1_1 => ProtocolVersion::V3_1_1,
    };
    let password = match (&c.password, &c.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("password_file {}: {e}", f.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let connect = Connect {
        protocol: version,
        clean_start: c.clean_start,
        keep_alive: c.keep_alive,
        client_id: c.client_id(),
        will: None,
        username: c.username.clone(),
        password: password.map(bytes::Bytes::from),
        properties: ConnectProperties {
            session_expiry_interval: Some(c.session_expiry).filter(|_| version.is_v5()),
            receive_maximum: NonZeroU16::new(c.max_inflight),
            maximum_packet_size: NonZeroU32::new(max_packet_size),
            ..ConnectProperties::default()
        },
        bridge: !version.is_v5() && c.try_private,
    };
    let mut out = BytesMut::new();
    encode_packet(&Packet::Connect(Box::new(connect)), version, &mut out)
        .map_err(|e| format!("CONNECT: {e}"))?;
    let handshake = async {
        io.write_all(&out)
            .await
            .map_err(|e| format!("CONNECT: {e}"))?;
        let mut buf = BytesMut::with_capacity(256);
        loop {
            match decode_packet(&mut buf, version, max_packet_size) {
                // What follows CONNACK in the same read (a resumed session's queue) is
                // the loop's to decode.
                Ok(Some(Packet::ConnAck(a))) => return Ok((a, buf)),
                Ok(Some(p)) => return Err(format!("expected CONNACK, got {}", p.name())),
                Ok(None) => {}
                Err(e) => return Err(format!("CONNACK: {e}")),
            }
            match io.read_buf(&mut buf).await {
                Ok(0) => return Err("closed by the remote before CONNACK".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("CONNACK: {e}")),
            }
        }
    };
    let (connack, rest) = tokio::time::timeout(deadline, handshake)
        .await
        .map_err(within("CONNACK"))??;
    if connack.reason != ReasonCode::Success {
        return Err(format!(
            "refused by the remote: {:?} ({:#04x})",
            connack.reason, connack.reason as u8
        ));
    }
    Ok(Connected {
        io,
        connack,
        version,
        rest,
    })
}

/// An open connection to the remote, CONNACK read.
struct Connected {
    io: Box<dyn Io>,
    connack: ConnAck,
    version: ProtocolVersion,
    /// Bytes read after CONNACK.
    rest: BytesMut,
}

/// Acknowledged records consumed from the queue in one store write.
const CONSUME_BATCH: u64 = 32;

/// Consumes `b`'s queue through what `outbox` has done (and wakes publishers waiting for
/// room).
fn consume(b: &Bridge, outbox: &Outbox) {
    let through = outbox.consumed();
    if through >= b.fifo.first() {
        b.fifo.consume_through(through);
    }
    b.made_room();
}

/// One connection's state.
struct Link<'a> {
    b: &'a Bridge,
    pipeline: &'a Pipeline,
    store: &'a Arc<Store>,
    ns: &'a Arc<str>,
    version: ProtocolVersion,
    max_packet_size: u32,
    /// Outbound messages in flight at most (ours and the remote's Receive Maximum).
    window: usize,
    /// The highest QoS the remote accepts.
    max_qos: QoS,
    /// Whether the remote keeps retained messages.
    retain: bool,
    /// The largest packet the remote accepts.
    max_out: usize,
    /// Acknowledgements and PUBRELs waiting for their store ticket, in order.
    held: VecDeque<(Option<u64>, Packet)>,
    out: BytesMut,
    last_in: Instant,
    last_out: Instant,
    /// SUBSCRIBE sent, SUBACK not yet received.
    subscribing: Option<PacketId>,
}

impl<'a> Link<'a> {
    fn new(
        b: &'a Bridge,
        pipeline: &'a Pipeline,
        store: &'a Arc<Store>,
        ns: &'a Arc<str>,
        version: ProtocolVersion,
        connack: &ConnAck,
        max_packet_size: u32,
    ) -> Link<'a> {
        let p = &connack.properties;
        let remote_window = p.receive_maximum.map_or(65_535, |n| usize::from(n.get()));
        Link {
            b,
            pipeline,
            store,
            ns,
            version,
            max_packet_size,
            window: usize::from(b.config.max_inflight).min(remote_window),
            max_qos: p.maximum_qos.unwrap_or(QoS::ExactlyOnce),
            retain: p.retain_available.unwrap_or(true),
            max_out: p
                .maximum_packet_size
                .map_or(usize::MAX, |n| n.get() as usize),
            held: VecDeque::new(),
            out: BytesMut::with_capacity(16 * 1024),
            last_in: Instant::now(),
            last_out: Instant::now(),
            subscribing: None,
        }
    }

    fn name(&self) -> &str {
        &self.b.config.name
    }

    fn send(&mut self, p: &Packet) {
        if let Err(e) = encode_packet(p, self.version, &mut self.out) {
            tracing::warn!(bridge = %self.name(), packet = p.name(), error = %e, "bridge packet not encodable");
        }
    }

    async fn serve(
        &mut self,
        io: Box<dyn Io>,
        mut rbuf: BytesMut,
        outbox: &mut Outbox,
        received: &mut Received,
        shutdown: &CancellationToken,
    ) -> Ended {
        let (mut rd, mut wr) = tokio::io::split(io);
        for seq in outbox.resume(self.b.fifo.first()) {
            // A QoS 2 flow whose record the queue dropped: completed, not abandoned.
            self.send(&Packet::PubRel(Ack::success(packet_id(seq))));
        }
        self.subscribe(outbox);
        let mut committed = self.store.committed();
        committed.borrow_and_update();
        let ka = u64::from(self.b.config.keep_alive);
        let mut tick = tokio::time::interval(Duration::from_secs((ka / 2).max(1)));
        rbuf.reserve(16 * 1024);
        let write_deadline = Duration::from_secs(self.b.config.connect_timeout.max(ka));
        if let Err(e) = (self.read(&mut rbuf, outbox, received)).and_then(|()| self.fill(outbox)) {
            return Ended::Lost(e);
        }
        loop {
            if !self.out.is_empty() {
                match tokio::time::timeout(write_deadline, wr.write_all(&self.out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Ended::Lost(format!("write: {e}")),
                    Err(_) => return Ended::Lost("the remote stopped reading".to_owned()),
                }
                self.out.clear();
                self.last_out = Instant::now();
            }
            let waiting = !self.held.is_empty() || self.wants_rows(outbox);
            // Not biased: a remote that never stops sending must not starve the keep
            // alive, the outbound queue or the held acknowledgements.
            let step = tokio::select! {
                () = shutdown.cancelled() => {
                    self.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
                    let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&self.out)).await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
                    return Ended::Shutdown;
                }
                r = rd.read_buf(&mut rbuf) => match r {
                    Ok(0) => Err("closed by the remote".to_owned()),
                    Ok(_) => {
                        self.last_in = Instant::now();
                        self.read(&mut rbuf, outbox, received)
                    }
                    Err(e) => Err(format!("read: {e}")),
                },
                r = committed.changed(), if waiting => match r {
                    Ok(()) => {
                        let upto = *committed.borrow_and_update();
                        self.release(upto);
                        self.fill(outbox)
                    }
                    Err(_) => Err("the store closed".to_owned()),
                },
                () = self.b.wake.notified() => {
                    self.qos0();
                    self.fill(outbox)
                }
                _ = tick.tick() => self.keep_alive(ka),
            };
            if let Err(why) = step {
                return Ended::Lost(why);
            }
        }
    }

    /// Subscribes to the inbound topics (again after every reconnect: it is idempotent,
    /// and follows a changed configuration).
    fn subscribe(&mut self, outbox: &mut Outbox) {
        let subs = self.b.map.subscriptions();
        if subs.is_empty() {
            return;
        }
        let mut filters = Vec::with_capacity(subs.len());
        for (pattern, qos) in subs {
            let Ok(f) = TopicFilter::new(&pattern) else {
                continue;
            };
            filters.push((
                f,
                SubscriptionOptions {
                    qos,
                    no_local: true,
                    retain_as_published: self.b.config.retain,
                    retain_handling: RetainHandling::SendIfNew,
                },
            ));
        }
        let id = outbox.reserve();
        self.subscribing = Some(id);
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: id,
            filters,
            properties: SubscribeProperties::default(),
        }));
    }

    fn keep_alive(&mut self, ka: u64) -> Result<(), String> {
        if ka == 0 {
            return Ok(());
        }
        if self.last_in.elapsed() > Duration::from_millis(ka * 1500) {
            return Err(format!("no answer from the remote within {}s", ka * 3 / 2));
        }
        if self.last_out.elapsed() >= Duration::from_secs(ka / 2) {
            self.send(&Packet::PingReq);
        }
        Ok(())
    }

    /// Sends what their tickets now allow of the held packets.
    fn release(&mut self, committed: u64) {
        while let Some((t, _)) = self.held.front() {
            if t.is_some_and(|t| committed < t) {
                break;
            }
            if let Some((_, p)) = self.held.pop_front() {
                self.send(&p);
            }
        }
    }

    /// Holds `p` until `ticket` is durable (sends it now without one).
    fn after(&mut self, ticket: Option<u64>, p: Packet) {
        if ticket.is_none() && self.held.is_empty() {
            self.send(&p);
        } else {
            self.held.push_back((ticket, p));
            self.release(*self.store.committed().borrow());
        }
    }

    fn read(
        &mut self,
        buf: &mut BytesMut,
        outbox: &mut Outbox,
        received: &mut Received,
    ) -> Result<(), String> {
        loop {
            let p = match decode_packet(buf, self.version, self.max_packet_size) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("bad packet from the remote: {e}")),
            };
            self.handle(p, outbox, received)?;
        }
    }

    fn handle(
        &mut self,
        p: Packet,
        outbox: &mut Outbox,
        received: &mut Received,
    ) -> Result<(), String> {
        match p {
            Packet::Publish(p) => self.inbound(p, received),
            Packet::PubAck(a) => {
                if let Acked::Done(_) = outbox.puback(a.packet_id) {
                    self.done(outbox, false, a.reason.is_error());
                }
                self.fill(outbox)
            }
            Packet::PubRec(a) => {
                match outbox.pubrec(a.packet_id, a.reason.is_error()) {
                    Acked::Received(seq) => {
                        // Marked before PUBREL goes: after a crash, PUBREL is what is sent
                        // again, never the message.
                        let ticket = self.b.fifo.replace(seq, RELEASED);
                        self.after(ticket, Packet::PubRel(Ack::success(a.packet_id)));
                    }
                    Acked::Done(_) => {
                        self.b.dropped("the remote refused it (PUBREC error)");
                        self.consume(outbox);
                    }
                    // MQTT-4.3.3: a PUBREC is answered with PUBREL, known or not.
                    Acked::Unknown => self.send(&Packet::PubRel(Ack::success(a.packet_id))),
                }
                self.fill(outbox)
            }
            Packet::PubComp(a) => {
                if let Acked::Done(_) = outbox.pubcomp(a.packet_id) {
                    // At once: until the commit, a crash would send it again, and the
                    // remote has forgotten its identifier.
                    self.done(outbox, true, a.reason.is_error());
                }
                self.fill(outbox)
            }
            Packet::PubRel(a) => {
                let ticket = match received.remove(&a.packet_id.get()) {
                    Some(_) => self.save_received(received),
                    None => None,
                };
                self.after(ticket, Packet::PubComp(Ack::success(a.packet_id)));
                Ok(())
            }
            Packet::SubAck(s) => {
                if self.subscribing == Some(s.packet_id) {
                    self.subscribing = None;
                    outbox.unreserve(s.packet_id);
                }
                let subs = self.b.map.subscriptions();
                for (i, r) in s.reasons.iter().enumerate() {
                    if r.is_error() {
                        let filter = subs.get(i).map_or("?", |s| s.0.as_str());
                        tracing::warn!(bridge = %self.name(), filter, reason = ?r,
                            "the remote refused a bridge subscription");
                    }
                }
                // Its identifier is free again: records that would have had it can go.
                self.fill(outbox)
            }
            Packet::PingResp | Packet::UnsubAck(_) => Ok(()),
            Packet::Disconnect(d) => Err(format!(
                "the remote sent DISCONNECT {:?} ({:#04x})",
                d.reason, d.reason as u8
            )),
            other => Err(format!("protocol error: the remote sent {}", other.name())),
        }
    }

    /// A message the remote acknowledged (`refused`: with an error code): counted, and
    /// the queue consumed through what is done (`now`, or in batches).
    fn done(&mut self, outbox: &Outbox, now: bool, refused: bool) {
        if refused {
            self.b
                .dropped("the remote refused it (an error reason code)");
        } else {
            self.b.stats.sent.fetch_add(1, Ordering::Relaxed);
        }
        if now {
            consume(self.b, outbox);
        } else {
            self.consume(outbox);
        }
    }

    fn save_received(&self, received: &Received) -> Option<u64> {
        let bytes: Vec<u8> = received.keys().flat_map(|id| id.to_be_bytes()).collect();
        self.store.kv_set(self.ns, QOS2_KEY, bytes)
    }

    /// A PUBLISH from the remote: into the pipeline, acknowledged once durable.
    fn inbound(&mut self, p: Publish, received: &mut Received) -> Result<(), String> {
        let Some(topic) = p.topic else {
            return Err("protocol error: a topic alias the bridge never allowed".to_owned());
        };
        let local = self.b.map.inbound(topic.as_str());
        self.b.stats.received.fetch_add(1, Ordering::Relaxed);
        let draft = local.and_then(|m| {
            let topic = match TopicName::new(&m.topic) {
                Ok(t) => t,
                Err(_) => {
                    tracing::warn!(bridge = %self.name(), topic = %m.topic, "bridged topic is not a valid topic name");
                    return None;
                }
            };
            Some(Draft {
                topic,
                payload: p.payload.clone(),
                qos: p.qos.qos(),
                retain: p.retain && self.b.config.retain,
                properties: p.properties.message.clone(),
            })
        });
        let from = Origin::Bridge {
            name: &self.b.config.name,
        };
        let route = |draft: Option<Draft>| {
            draft
                .and_then(|d| self.pipeline.publish(&from, d))
                .and_then(|r| r.ticket)
        };
        match p.qos {
            PublishQoS::AtMostOnce => {
                route(draft);
            }
            PublishQoS::AtLeastOnce(id) => {
                let ticket = route(draft);
                self.after(ticket, Packet::PubAck(Ack::success(id)));
            }
            PublishQoS::ExactlyOnce(id) => {
                let ticket = if let Some(first) = received.get(&id.get()) {
                    // A resend: routed the first time; its PUBREC waits for that routing.
                    *first
                } else {
                    // MQTT 5: our Receive Maximum; 3.1.1 has none (the identifiers bound it).
                    let max = match self.version.is_v5() {
                        true => usize::from(self.b.config.max_inflight),
                        false => usize::from(u16::MAX),
                    };
                    if received.len() >= max {
                        return Err(
                            "the remote sent more QoS 2 messages than our Receive Maximum"
                                .to_owned(),
                        );
                    }
                    received.insert(id.get(), None);
                    // The routing and the identifier commit together.
                    let group = self.store.group();
                    let t = route(draft).max(self.save_received(received));
                    drop(group);
                    received.insert(id.get(), t);
                    t
                };
                self.after(ticket, Packet::PubRec(Ack::success(id)));
            }
        }
        Ok(())
    }

    /// Whether to read the queue now: records are unread (the queue's last one is not sent
    /// yet) and half the window is free (refilled in one read of the store rather than one
    /// per acknowledgement), or nothing is in flight.
    fn wants_rows(&self, outbox: &Outbox) -> bool {
        let room = self.window.saturating_sub(outbox.in_flight());
        room > 0
            && self.b.fifo.last() > outbox.sent_through
            && (room >= self.window.div_ceil(2) || outbox.in_flight() == 0)
            && outbox.can_send(outbox.sent_through + 1)
    }

    /// Sends queued records while the window has room.
    fn fill(&mut self, outbox: &mut Outbox) -> Result<(), String> {
        // Records a full queue dropped (drop-oldest) are behind us: consumption goes on
        // from the queue's oldest.
        outbox.skip_to(self.b.fifo.first());
        self.b.made_room();
        loop {
            if !self.wants_rows(outbox) {
                return Ok(());
            }
            let room = self.window.saturating_sub(outbox.in_flight());
            let rows = match self.b.fifo.read_after(outbox.sent_through, room) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(bridge = %self.name(), error = %e, "bridge queue unreadable");
                    return Ok(());
                }
            };
            let full = rows.len() == room;
            for (seq, row) in rows {
                if outbox.is_done(seq) {
                    outbox.skipped(seq);
                    continue;
                }
                if !outbox.can_send(seq) {
                    return Ok(());
                }
                self.send_row(seq, &row, outbox);
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn send_row(&mut self, seq: u64, row: &[u8], outbox: &mut Outbox) {
        let dup = seq <= self.b.sent_high.fetch_max(seq, Ordering::Relaxed);
        if row.is_empty() {
            // `RELEASED`: the remote has it; PUBREL goes again.
            outbox.sent(seq, Step::AwaitComp);
            self.send(&Packet::PubRel(Ack::success(packet_id(seq))));
            return;
        }
        match Store::open_sink_record(row) {
            Ok((_, _, msg)) => {
                let Some(p) = self.publish_of(&msg, packet_id(seq), dup) else {
                    if dup && msg.qos == QoS::ExactlyOnce {
                        // Sent before and no longer sendable (too large for the
                        // remote now, or no longer selected): the remote may hold its
                        // identifier, so the flow is closed with PUBREL.
                        outbox.sent(seq, Step::AwaitComp);
                        self.send(&Packet::PubRel(Ack::success(packet_id(seq))));
                    } else {
                        outbox.skipped(seq);
                        self.consume(outbox);
                    }
                    return;
                };
                match p.qos {
                    PublishQoS::AtMostOnce => {
                        outbox.skipped(seq);
                        self.b.stats.sent.fetch_add(1, Ordering::Relaxed);
                        self.consume(outbox);
                    }
                    PublishQoS::AtLeastOnce(_) => outbox.sent(seq, Step::AwaitAck),
                    PublishQoS::ExactlyOnce(_) => outbox.sent(seq, Step::AwaitRec),
                }
                self.send(&Packet::Publish(p));
            }
            Err(e) => {
                tracing::error!(bridge = %self.name(), error = %e, seq, "bridge queue record unreadable: skipped");
                outbox.skipped(seq);
                self.consume(outbox);
            }
        }
    }

    /// Consumes the queue through what is done, once `CONSUME_BATCH` records are (one
    /// store write for many acknowledgements; a crash sends the few done since again, as
    /// QoS 1 allows) or nothing is in flight.
    fn consume(&mut self, outbox: &Outbox) {
        let done = (outbox.consumed() + 1).saturating_sub(self.b.fifo.first());
        if done >= CONSUME_BATCH || (done > 0 && outbox.in_flight() == 0) {
            consume(self.b, outbox);
        }
    }

    /// The PUBLISH that carries `msg` to the remote, or `None` when it no longer goes
    /// (expired, no outbound topic selects it, too large for the remote; counted).
    fn publish_of(
        &self,
        msg: &crate::message::Message,
        id: PacketId,
        dup: bool,
    ) -> Option<Publish> {
        let now = Instant::now();
        // A message sent before is sent again even if it expired since (the remote may
        // hold its QoS 2 identifier).
        if !dup && msg.is_expired(now) {
            self.b.dropped("expired before the remote took it");
            return None;
        }
        let mapped = self.b.map.outbound(msg.topic.as_str())?;
        let topic = TopicName::new(&mapped.topic).ok()?;
        let qos = msg.qos.min(mapped.qos).min(self.max_qos);
        let mut properties = PublishProperties::default();
        if self.version.is_v5() {
            properties.message = msg.properties.clone();
            properties.message.message_expiry_interval = msg.remaining_expiry(now);
        }
        let p = Publish {
            dup: dup && qos != QoS::AtMostOnce,
            qos: PublishQoS::with_id(qos, id),
            retain: msg.retain && self.b.config.retain && self.retain,
            topic: Some(topic),
            payload: msg.payload.clone(),
            properties,
        };
        if publish_len(&p, self.version) > self.max_out {
            self.b
                .dropped("larger than the remote's Maximum Packet Size");
            return None;
        }
        Some(p)
    }

    /// Sends the QoS 0 messages waiting in memory.
    fn qos0(&mut self) {
        let waiting = std::mem::take(&mut *self.b.lock_qos0());
        for msg in waiting {
            if let Some(p) = self.publish_of(&msg, PacketId::FIRST, false) {
                let p = Publish {
                    qos: PublishQoS::AtMostOnce,
                    dup: false,
                    ..p
                };
                self.b.stats.sent.fetch_add(1, Ordering::Relaxed);
                self.send(&Packet::Publish(p));
            }
        }
    }
}
