//! The client side of MQTT as the load generator needs it, on `sandpiper::codec`: connect
//! and subscribe with deadlines, and PUBLISH templates encoded once and patched in place
//! (packet id and payload header) for every message.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use sandpiper::codec::{
    self, Connect, ConnectProperties, Packet, PacketId, ProtocolVersion, Publish,
    PublishProperties, PublishQoS, QoS, ReasonCode, Subscribe, SubscribeProperties,
    SubscriptionOptions, TopicFilter, TopicName,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::track::{HEADER_LEN, Stamp};

/// Largest packet we accept from a broker.
pub const MAX_PACKET: u32 = 16 * 1024 * 1024;

/// Read buffer capacity kept free before each read.
pub const READ_CHUNK: usize = 64 * 1024;

/// A connected client: its socket and whatever the broker sent after the packet we waited
/// for (it belongs to the next reader).
#[derive(Debug)]
pub struct Client {
    /// The socket, `TCP_NODELAY` set.
    pub stream: TcpStream,
    /// Bytes read but not decoded yet.
    pub inbuf: BytesMut,
    /// Version spoken.
    pub version: ProtocolVersion,
}

/// Encodes `p` into `out`; our own packets always encode.
pub fn encode(p: &Packet, version: ProtocolVersion, out: &mut BytesMut) -> anyhow::Result<()> {
    codec::encode_packet(p, version, out).with_context(|| format!("encoding {}", p.name()))
}

impl Client {
    /// Opens a TCP connection, sends CONNECT (keep alive off; a clean session unless
    /// `persistent`, which asks for a session that outlives the connection) and waits for
    /// a successful CONNACK, all within `deadline`.
    pub async fn connect(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        persistent: bool,
        deadline: Duration,
    ) -> anyhow::Result<Client> {
        Self::connect_keeping_alive(addr, version, client_id, persistent, 0, deadline).await
    }

    /// [`Client::connect`] with a keep alive of `keep_alive` seconds (0: off); the caller
    /// then pings at least that often.
    pub async fn connect_keeping_alive(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        persistent: bool,
        keep_alive: u16,
        deadline: Duration,
    ) -> anyhow::Result<Client> {
        tokio::time::timeout(
            deadline,
            Self::connect_inner(addr, version, client_id, persistent, keep_alive),
        )
        .await
        .with_context(|| format!("no CONNACK within {deadline:?}"))?
    }

    async fn connect_inner(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        persistent: bool,
        keep_alive: u16,
    ) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let mut c = Client {
            stream,
            inbuf: BytesMut::with_capacity(1024),
            version,
        };
        let connect = Connect {
            protocol: version,
            clean_start: !persistent,
            // Off unless asked for: throughput runs never go quiet, and an idle connection
            // that asks for one pings (`connections --keep-alive`).
            keep_alive,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: (persistent && version.is_v5()).then_some(3600),
                ..ConnectProperties::default()
            },
            bridge: false,
        };
        let mut out = BytesMut::new();
        encode(&Packet::Connect(Box::new(connect)), version, &mut out)?;
        c.stream.write_all(&out).await.context("sending CONNECT")?;
        match c.next_packet().await? {
            Packet::ConnAck(ack) if ack.reason == ReasonCode::Success => Ok(c),
            Packet::ConnAck(ack) => bail!("connection refused: {:?}", ack.reason),
            other => bail!("expected CONNACK, got {}", other.name()),
        }
    }

    /// Reads until one whole packet is there and returns it.
    pub async fn next_packet(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(p) = codec::decode_packet(&mut self.inbuf, self.version, MAX_PACKET)
                .context("decoding a packet from the broker")?
            {
                return Ok(p);
            }
            self.inbuf.reserve(4096);
            let n = self
                .stream
                .read_buf(&mut self.inbuf)
                .await
                .context("reading from the broker")?;
            if n == 0 {
                bail!("the broker closed the connection");
            }
        }
    }

    /// Subscribes to `filter` at `qos` and waits for the SUBACK; returns the granted QoS.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: QoS,
        deadline: Duration,
    ) -> anyhow::Result<QoS> {
        let filter = TopicFilter::new(filter).with_context(|| format!("topic filter {filter}"))?;
        let sub = Subscribe {
            packet_id: PacketId::FIRST,
            filters: vec![(filter, SubscriptionOptions::qos(qos))],
            properties: SubscribeProperties::default(),
        };
        let mut out = BytesMut::new();
        encode(&Packet::Subscribe(sub), self.version, &mut out)?;
        self.stream
            .write_all(&out)
            .await
            .context("sending SUBSCRIBE")?;
        let ack = tokio::time::timeout(deadline, async {
            loop {
                match self.next_packet().await? {
                    Packet::SubAck(a) => return anyhow::Ok(a),
                    // A broker may deliver retained messages or PINGRESP first; nothing
                    // else is expected before our first publish.
                    Packet::Publish(_) | Packet::PingResp => {}
                    other => bail!("expected SUBACK, got {}", other.name()),
                }
            }
        })
        .await
        .with_context(|| format!("no SUBACK within {deadline:?}"))??;
        match ack.reasons.first() {
            Some(ReasonCode::Success) => Ok(QoS::AtMostOnce),
            Some(ReasonCode::GrantedQoS1) => Ok(QoS::AtLeastOnce),
            Some(ReasonCode::GrantedQoS2) => Ok(QoS::ExactlyOnce),
            Some(r) => bail!("subscription refused: {r:?}"),
            None => bail!("SUBACK without a reason code"),
        }
    }
}

/// A PUBLISH encoded once; each message copies it and patches the packet id and the
/// payload header.
#[derive(Debug, Clone)]
pub struct Template {
    bytes: Vec<u8>,
    /// Offset of the packet identifier (QoS 1 and 2).
    id_at: Option<usize>,
    /// Offset of the payload.
    payload_at: usize,
}

/// A packet id with a recognisable bit pattern, to find it in the encoded template.
const PROBE_ID: u16 = 0xA55A;

impl Template {
    /// Encodes a PUBLISH of `payload_len` bytes to `topic` and finds where the packet id and
    /// payload are, checking the result by decoding a patched copy.
    pub fn new(
        topic: &str,
        qos: QoS,
        payload_len: usize,
        version: ProtocolVersion,
    ) -> anyhow::Result<Template> {
        if payload_len < HEADER_LEN {
            bail!("payload must be at least {HEADER_LEN} bytes (publisher id, sequence, time)");
        }
        let topic_name = TopicName::new(topic).with_context(|| format!("topic {topic}"))?;
        let probe = PacketId::new(PROBE_ID).context("probe packet id")?;
        let publish = Publish {
            dup: false,
            qos: PublishQoS::with_id(qos, probe),
            retain: false,
            topic: Some(topic_name),
            payload: vec![0u8; payload_len].into(),
            properties: PublishProperties::default(),
        };
        let mut out = BytesMut::new();
        encode(&Packet::Publish(publish), version, &mut out)?;
        let bytes = out.to_vec();
        // The payload ends the packet; the packet id comes right before it in 3.x, and
        // right before the (empty, one-byte) property section in 5.0.
        let payload_at = bytes
            .len()
            .checked_sub(payload_len)
            .context("template shorter than its payload")?;
        let id_at = match qos {
            QoS::AtMostOnce => None,
            _ => {
                let at = payload_at
                    .checked_sub(2 + usize::from(version.is_v5()))
                    .context("no room for a packet id")?;
                if bytes.get(at..at + 2) != Some(&PROBE_ID.to_be_bytes()[..]) {
                    bail!("packet id not where expected in the encoded PUBLISH");
                }
                Some(at)
            }
        };
        let t = Template {
            bytes,
            id_at,
            payload_at,
        };
        t.check(qos, version)?;
        Ok(t)
    }

    /// Encoded size of one message.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one message to `out` with packet id `id` (ignored at QoS 0) and `stamp`.
    pub fn put(&self, out: &mut BytesMut, id: u16, stamp: Stamp) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let Some(pkt) = out.get_mut(start..) else {
            return;
        };
        if let Some(at) = self.id_at
            && let Some(slot) = pkt.get_mut(at..at + 2)
        {
            slot.copy_from_slice(&id.to_be_bytes());
        }
        if let Some(payload) = pkt.get_mut(self.payload_at..) {
            stamp.write(payload);
        }
    }

    /// Decodes a patched copy to prove the offsets right before any broker sees one.
    fn check(&self, qos: QoS, version: ProtocolVersion) -> anyhow::Result<()> {
        let stamp = Stamp {
            publisher: 3,
            seq: 12_345,
            sent_ns: 67_890,
        };
        let mut buf = BytesMut::new();
        self.put(&mut buf, 4242, stamp);
        let Some(Packet::Publish(p)) =
            codec::decode_packet(&mut buf, version, MAX_PACKET).context("template check")?
        else {
            bail!("template does not decode as one PUBLISH");
        };
        let id_ok = match p.qos.packet_id() {
            Some(id) => id.get() == 4242,
            None => qos == QoS::AtMostOnce,
        };
        if !id_ok || Stamp::read(&p.payload) != Some(stamp) || !buf.is_empty() {
            bail!("patched template does not decode to what was patched in");
        }
        Ok(())
    }
}

/// Appends an acknowledgement packet (PUBACK, PUBREC, PUBREL or PUBCOMP) for `id`.
pub fn put_ack(
    out: &mut BytesMut,
    kind: fn(codec::Ack) -> Packet,
    id: PacketId,
    version: ProtocolVersion,
) -> anyhow::Result<()> {
    encode(&kind(codec::Ack::success(id)), version, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_patch_every_version_and_qos() {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                let t = Template::new("bench/0", qos, 64, version);
                assert!(t.is_ok(), "{version} {qos:?}: {t:?}");
            }
        }
        assert!(Template::new("bench/0", QoS::AtMostOnce, 8, ProtocolVersion::V5).is_err());
    }
}
