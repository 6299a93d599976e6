//! Transports: what turns an accepted TCP socket into the two byte streams a connection
//! reads and writes. TLS (rustls) and WebSocket (tungstenite) are layered here, so that
//! `connection` sees only `AsyncRead` / `AsyncWrite` halves and knows nothing of them.
//!
//! Boundary: no MQTT here. The only promise a transport makes beyond moving bytes is the
//! one of [`Flushed`]: a write the connection was told is done has reached the socket.

pub mod tls;
pub mod ws;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The read half of a transport that is not plain TCP.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a transport that is not plain TCP.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A stream whose `poll_write` reports bytes as written only once they are flushed to the
/// layer below.
///
/// Why: a connection task writes when it has output and never calls `flush` (a TCP socket
/// needs none). TLS and WebSocket streams accept bytes into their own buffers and send them
/// on the next write or flush; if the socket was full at that moment and the connection then
/// has nothing more to say, those bytes would wait forever. Here a write is `Pending` until
/// the flush completes, and its waker is the socket's.
///
/// Contract (kept by every writer in this crate: they write from the front of a buffer that
/// is only appended to): after `Pending`, the next `poll_write` passes the same bytes first.
#[derive(Debug)]
pub struct Flushed<S> {
    inner: S,
    /// Bytes the inner stream has taken but not yet flushed.
    pending: Option<usize>,
}

impl<S> Flushed<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Flushed {
            inner,
            pending: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Flushed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Flushed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            this.pending = Some(n);
        }
        let flushed = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        let n = this.pending.take().unwrap_or(0);
        Poll::Ready(flushed.map(|()| n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Splits a stream into boxed halves for `connection::run`.
pub fn split<S>(stream: S) -> (BoxRead, BoxWrite)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (rd, wr) = tokio::io::split(Flushed::new(stream));
    (Box::new(rd), Box::new(wr))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

    /// A buffering writer that never flushes by itself still delivers every byte.
    #[tokio::test]
    async fn flushed_delivers_without_explicit_flush() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = Flushed::new(BufWriter::new(a));
        w.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        tokio::time::timeout(std::time::Duration::from_secs(1), b.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"hello");
    }
}
