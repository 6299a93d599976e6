//! MQTT over WebSocket (MQTT 5 §6, MQTT 3.1.1 §6): the HTTP upgrade on a configured path
//! with subprotocol `mqtt`, and [`WsStream`], which turns the message stream back into the
//! byte stream a connection reads and writes.
//!
//! The spec lets MQTT packets and WebSocket frames cut each other anywhere: one packet may
//! span several frames and one frame may carry several packets. The adapter therefore
//! hands the connection the frames' bytes in order and leaves packet framing to the codec.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

/// Subprotocols accepted, in order of preference: `mqtt` (MQTT 3.1.1 and 5) and the
/// `mqttv3.1` some MQTT 3.1 clients still send.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Which browser pages may open a connection, by the `Origin` header browsers send with
/// every WebSocket request (RFC 6455 §4.2.1, §10.2). A request without one (a device, a
/// Node or Python client) is never refused for it: the header stops a web page that a
/// local browser has open from reaching the broker, not clients, which can send anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// Any origin.
    Any,
    /// Only these origins (`scheme://host[:port]`, compared without case); empty: no
    /// browser page at all.
    Only(Vec<String>),
}

impl Origins {
    /// Whether a request with this `Origin` header may upgrade.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match (self, origin) {
            (_, None) | (Origins::Any, _) => true,
            (Origins::Only(list), Some(o)) => {
                let o = o.trim().trim_end_matches('/');
                list.iter()
                    .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(o))
            }
        }
    }
}

/// What the upgrade checks: the HTTP path and the allowed origins.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The path of the MQTT endpoint.
    pub path: String,
    /// The pages that may connect.
    pub origins: Origins,
}

/// Performs the WebSocket upgrade: the request must be for the endpoint's path, come from
/// an allowed origin (else HTTP 403, logged), and if it names subprotocols, one of them
/// must be `mqtt` (echoed back, MQTT-6.0.0-3/4). `max_message` bounds what one WebSocket
/// message may buffer.
pub async fn accept<S>(
    stream: S,
    endpoint: &Endpoint,
    max_message: usize,
) -> Result<WsStream<S>, tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let endpoint = endpoint.clone();
    #[allow(
        clippy::result_large_err,
        reason = "the callback's signature is tungstenite's"
    )]
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != endpoint.path {
            return Err(refusal(
                StatusCode::NOT_FOUND,
                "no MQTT endpoint on this path",
            ));
        }
        let origin = req
            .headers()
            .get("origin")
            .map(|v| v.to_str().unwrap_or("(not text)"));
        if !endpoint.origins.allows(origin) {
            tracing::info!(
                origin = origin.unwrap_or_default(),
                "WebSocket request from a browser page of an origin not in the listener's allowed_origins: refused (HTTP 403)"
            );
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "origin not allowed on this listener",
            ));
        }
        let offered: Vec<&str> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        if offered.is_empty() {
            // Tolerated: some clients do not name the subprotocol.
            return Ok(resp);
        }
        match SUBPROTOCOLS.iter().find(|p| offered.contains(p)) {
            Some(p) => {
                resp.headers_mut()
                    .insert("sec-websocket-protocol", HeaderValue::from_static(p));
                Ok(resp)
            }
            None => Err(refusal(
                StatusCode::BAD_REQUEST,
                "subprotocol mqtt is required",
            )),
        }
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsStream::new(ws))
}

fn refusal(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_owned()));
    *r.status_mut() = status;
    r
}

/// A WebSocket connection seen as a byte stream: binary messages' payloads in order when
/// reading, one binary message per write when writing. A text message is an error
/// (MQTT-6.0.0-1); pings are answered by tungstenite; a close ends the stream.
#[derive(Debug)]
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The rest of the last message read.
    rest: Bytes,
    /// Bytes of the last write taken into a message but not yet flushed.
    pending: Option<usize>,
}

impl<S> WsStream<S> {
    /// Wraps an upgraded WebSocket.
    pub fn new(inner: WebSocketStream<S>) -> Self {
        WsStream {
            inner,
            rest: Bytes::new(),
            pending: None,
        }
    }
}

fn io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.rest.is_empty() {
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                Some(Ok(Message::Binary(b))) => this.rest = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message (MQTT-6.0.0-1)",
                    )));
                }
                Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            }
        }
        let n = this.rest.len().min(buf.remaining());
        buf.put_slice(&this.rest[..n]);
        this.rest.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    /// Sends `buf` as one binary message and reports it written once flushed (see
    /// [`super::Flushed`] for why, and for the same contract on the caller).
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(io_error)?;
            Pin::new(&mut this.inner)
                .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
                .map_err(io_error)?;
            this.pending = Some(buf.len());
        }
        let flushed = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        let n = this.pending.take().unwrap_or(0);
        Poll::Ready(flushed.map(|()| n).map_err(io_error))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.inner).poll_close(cx)) {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn endpoint(origins: Origins) -> Endpoint {
        Endpoint {
            path: "/mqtt".into(),
            origins,
        }
    }

    /// Bytes split over several messages read back as one stream, and several writes
    /// arrive as messages in order.
    #[tokio::test]
    async fn messages_become_a_byte_stream() {
        let (a, b) = tokio::io::duplex(4096);
        let server =
            tokio::spawn(async move { accept(a, &endpoint(Origins::Any), 1 << 16).await.unwrap() });
        let (mut client, resp) = tokio_tungstenite::client_async(
            {
                use tungstenite::client::IntoClientRequest;
                let mut r = "ws://localhost/mqtt".into_client_request().unwrap();
                r.headers_mut()
                    .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
                r
            },
            b,
        )
        .await
        .unwrap();
        assert_eq!(
            resp.headers().get("sec-websocket-protocol").unwrap(),
            "mqtt"
        );
        let mut server = server.await.unwrap();
        for part in [
            &b"\x10\x0c\x00\x04MQ"[..],
            b"TT\x04\x02\x00",
            b"\x3c\x00\x00\xc0\x00",
        ] {
            client
                .send(Message::Binary(Bytes::copy_from_slice(part)))
                .await
                .unwrap();
        }
        let mut got = vec![0u8; 16];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..2], b"\x10\x0c");
        assert_eq!(&got[14..], b"\xc0\x00");
        server.write_all(b"\x20\x02\x00\x00").await.unwrap();
        use futures_util::StreamExt;
        let m = client.next().await.unwrap().unwrap();
        assert_eq!(m, Message::Binary(Bytes::from_static(b"\x20\x02\x00\x00")));
    }

    #[tokio::test]
    async fn wrong_path_is_refused() {
        let (a, b) = tokio::io::duplex(4096);
        let server =
            tokio::spawn(async move { accept(a, &endpoint(Origins::Any), 1 << 16).await.is_err() });
        let client = tokio_tungstenite::client_async("ws://localhost/other", b).await;
        assert!(client.is_err());
        assert!(server.await.unwrap());
    }

    /// A browser request (with `Origin`) upgrades only from a listed origin; a request
    /// without one always does.
    #[tokio::test]
    async fn origins_are_checked() {
        let only = Origins::Only(vec!["https://app.example.com".into()]);
        for (origin, ok) in [
            (None, true),
            (Some("https://app.example.com"), true),
            (Some("HTTPS://App.Example.com/"), true),
            (Some("https://evil.example.com"), false),
            (Some("null"), false),
        ] {
            let (a, b) = tokio::io::duplex(4096);
            let e = endpoint(only.clone());
            let server = tokio::spawn(async move { accept(a, &e, 1 << 16).await.is_ok() });
            let mut r = {
                use tungstenite::client::IntoClientRequest;
                "ws://localhost/mqtt".into_client_request().unwrap()
            };
            if let Some(o) = origin {
                r.headers_mut()
                    .insert("origin", HeaderValue::from_static(o));
            }
            let client = tokio_tungstenite::client_async(r, b).await;
            assert_eq!(client.is_ok(), ok, "{origin:?}");
            assert_eq!(server.await.unwrap(), ok, "{origin:?}");
        }
        assert!(!Origins::Only(Vec::new()).allows(Some("http://localhost:8080")));
        assert!(Origins::Any.allows(Some("http://localhost:8080")));
    }
}
