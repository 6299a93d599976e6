//! What waits to be written to a client: encoded packets, and the payloads of large
//! PUBLISHes by reference. A payload of [`BY_REFERENCE`] bytes or more is not copied into
//! the write buffer: the bytes before it are cut off as one piece and the payload, shared
//! with the message, follows as another, and a vectored write sends the pieces as they
//! are. Smaller packets are encoded into one buffer, as always.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::codec::{self, EncodeError, Packet, ProtocolVersion};

/// Payloads from this size on are written from the message itself.
pub(super) const BY_REFERENCE: usize = 16 * 1024;
/// Most pieces one write takes.
const IOV: usize = 32;

/// The connection's output, in order.
#[derive(Debug, Default)]
pub(super) struct Out {
    /// Pieces before `tail`: cut-off encoded bytes and shared payloads.
    pieces: VecDeque<Bytes>,
    /// Bytes in `pieces`.
    queued: usize,
    /// Where packets are encoded.
    tail: BytesMut,
}

impl Out {
    /// Bytes waiting.
    pub(super) fn len(&self) -> usize {
        self.queued + self.tail.len()
    }

    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives back the memory a burst grew, once everything is written.
    pub(super) fn shrink(&mut self, above: usize) {
        if self.is_empty() && self.tail.capacity() > above {
            self.tail = BytesMut::new();
        }
    }

    /// Appends encoded bytes.
    pub(super) fn extend_from_slice(&mut self, b: &[u8]) {
        self.tail.extend_from_slice(b);
    }

    /// Encodes `p` at the end.
    pub(super) fn encode(
        &mut self,
        p: &Packet,
        version: ProtocolVersion,
    ) -> Result<(), EncodeError> {
        match p {
            Packet::Publish(publish) if publish.payload.len() >= BY_REFERENCE => {
                codec::encode_publish_head(publish, version, &mut self.tail)?;
                let head = self.tail.split().freeze();
                self.push(head);
                self.push(publish.payload.clone());
                Ok(())
            }
            _ => codec::encode_packet(p, version, &mut self.tail),
        }
    }

    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.queued += b.len();
            self.pieces.push_back(b);
        }
    }
}

impl Buf for Out {
    fn remaining(&self) -> usize {
        self.len()
    }

    fn chunk(&self) -> &[u8] {
        match self.pieces.front() {
            Some(b) => b,
            None => &self.tail,
        }
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.pieces.front_mut() else {
                self.tail.advance(n.min(self.tail.len()));
                return;
            };
            let k = n.min(front.len());
            front.advance(k);
            self.queued -= k;
            n -= k;
            if front.is_empty() {
                self.pieces.pop_front();
            }
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let pieces = self.pieces.iter().map(|b| &b[..]);
        for piece in pieces.chain(std::iter::once(&self.tail[..])) {
            if n == dst.len() {
                break;
            }
            if let Some(slot) = dst.get_mut(n).filter(|_| !piece.is_empty()) {
                *slot = IoSlice::new(piece);
                n += 1;
            }
        }
        n
    }
}

/// Writes what it can of `out` in one (vectored) write: how many bytes. The same bytes are
/// presented again after a write that did not finish (what TLS and WebSocket streams need).
pub(super) async fn write<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut Out,
) -> std::io::Result<usize> {
    let n = {
        let mut slices = [IoSlice::new(&[]); IOV];
        let k = out.chunks_vectored(&mut slices);
        match slices.get(..k) {
            Some([one]) => wr.write(one).await?,
            Some(many) => wr.write_vectored(many).await?,
            None => 0,
        }
    };
    out.advance(n);
    Ok(n)
}

/// Writes all of `out`.
pub(super) async fn write_all<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut Out,
) -> std::io::Result<()> {
    while !out.is_empty() {
        if write(wr, out).await? == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::codec::{Publish, PublishQoS, TopicName};

    fn publish(payload: usize) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos: PublishQoS::AtMostOnce,
            retain: false,
            topic: Some(TopicName::new("a/b").unwrap()),
            properties: Default::default(),
            payload: Bytes::from(vec![7u8; payload]),
        })
    }

    #[tokio::test]
    async fn pieces_come_out_as_one_encoding_would() {
        for v in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let packets = [
                publish(10),
                publish(BY_REFERENCE),
                publish(3),
                publish(70_000),
            ];
            let mut want = BytesMut::new();
            let mut out = Out::default();
            for p in &packets {
                codec::encode_packet(p, v, &mut want).unwrap();
                out.encode(p, v).unwrap();
            }
            assert_eq!(out.len(), want.len());
            // A writer that takes a few bytes at a time, as a full socket does.
            let mut got = Vec::new();
            let mut slow = tokio_test_writer(&mut got);
            write_all(&mut slow, &mut out).await.unwrap();
            assert_eq!(got, want.to_vec());
            assert!(out.is_empty() && out.pieces.is_empty());
        }
    }

    fn tokio_test_writer(v: &mut Vec<u8>) -> Trickle<'_> {
        Trickle(v)
    }

    /// Takes at most 1,000 bytes per write, vectored or not.
    struct Trickle<'a>(&'a mut Vec<u8>);

    impl AsyncWrite for Trickle<'_> {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(1000);
            self.get_mut().0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let me = self.get_mut();
            let mut left = 1000;
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(left);
                me.0.extend_from_slice(&b[..k]);
                n += k;
                left -= k;
                if left == 0 {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
}
