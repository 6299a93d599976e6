//! Transports end to end: TLS and mutual TLS (raw MQTT over tokio-rustls), certificate
//! reloading, WebSocket and WebSocket over TLS (tokio-tungstenite), and the per-listener
//! protocol versions. Certificates come from `tests/certs/generate` (openssl CLI).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::harness::{Broker, WAIT, raw};

/// Generates the test certificates into `dir/certs`.
pub fn generate_certs(dir: &Path) -> PathBuf {
    let out = dir.join("certs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/certs/generate");
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run tests/certs/generate (needs the openssl CLI)");
    assert!(status.success(), "tests/certs/generate failed: {status}");
    out
}

fn tls_listener(name: &str, kind: &str, certs: &Path, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nkind = \"{kind}\"\nbind = \"127.0.0.1:0\"\n\
         cert = \"{}\"\nkey = \"{}\"\n{extra}\n",
        certs.join("server.pem").display(),
        certs.join("server.key").display(),
    )
}

const PLAIN: &str = "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\n";
const LOG: &str = "[log]\nlevel = \"info\"\n";

/// A rustls client configuration trusting `ca`, presenting `client` (name prefix of a
/// `.pem` / `.key` pair in the same folder) if given.
pub(crate) fn client_config(ca: &Path, client: Option<&Path>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(c.expect("ca pem")).expect("ca cert");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client {
        Some(prefix) => {
            let chain = CertificateDer::pem_file_iter(prefix.with_extension("pem"))
                .expect("client cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("client pem");
            let key = PrivateKeyDer::from_pem_file(prefix.with_extension("key")).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

pub(crate) async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Reads one MQTT packet from any stream: `(first byte, body)`, `None` at EOF or error.
async fn read_packet<S: AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let fut = async {
        let first = s.read_u8().await.ok()?;
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let b = s.read_u8().await.ok()?;
            len |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.ok()?;
        Some((first, body))
    };
    timeout(WAIT, fut)
        .await
        .expect("no packet and no close in time")
}

/// Sends a 3.1.1 CONNECT and returns the CONNACK return code, `None` if the connection
/// closed first.
async fn connect_code<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, id: &str) -> Option<u8> {
    s.write_all(&raw::connect_v311(id, true, 30)).await.ok()?;
    let (first, body) = read_packet(s).await?;
    assert_eq!(first, 0x20, "CONNACK expected");
    body.get(1).copied()
}

fn subscribe(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend_from_slice(&u16::try_from(filter.len()).unwrap().to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0);
    raw::packet(0x82, &body)
}

async fn publish_tcp(addr: SocketAddr, topic: &str, payload: &[u8]) {
    let mut s = TcpStream::connect(addr).await.expect("tcp connect");
    assert_eq!(connect_code(&mut s, "tcp-publisher").await, Some(0));
    s.write_all(&raw::publish(topic, 1, false, 1, payload, false))
        .await
        .expect("publish");
    let (first, _) = read_packet(&mut s).await.expect("PUBACK");
    assert_eq!(first, 0x40);
}

/// Expects a PUBLISH of `payload` on `s`.
async fn expect_publish<S: AsyncRead + Unpin>(s: &mut S, payload: &[u8]) {
    let (first, body) = read_packet(s).await.expect("PUBLISH");
    assert_eq!(first & 0xf0, 0x30, "PUBLISH expected, got {first:#x}");
    assert!(body.ends_with(payload), "payload {body:?}");
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let dir = Broker::temp_dir();
    let certs = generate_certs(&dir);
    let ca = certs.join("ca.pem");
    let client_ca = format!("client_ca = \"{}\"\n", ca.display());
    let config = format!(
        "{PLAIN}\n{}\n{}\n{LOG}",
        tls_listener(
            "mtls",
            "tls",
            &certs,
            &format!("{client_ca}username_from_cert = true\nallow_anonymous = false")
        ),
        tls_listener(
            "optional",
            "tls",
            &certs,
            &format!(
                "{client_ca}require_client_cert = false\nusername_from_cert = true\n\
                 allow_anonymous = false"
            )
        ),
    );
    let broker = Broker::start_config_in(dir, &config);
    let mtls = broker.listener_addr("mtls");
    let optional = broker.listener_addr("optional");
    let plain = broker.listener_addr("plain");

    // A client with a certificate of our CA is let in although anonymous clients are not:
    // its certificate authenticates it. It receives what a TCP client publishes.
    let good = client_config(&ca, Some(&certs.join("client")));
    let mut sub = tls_connect(mtls, good.clone())
        .await
        .expect("mTLS handshake");
    assert_eq!(connect_code(&mut sub, "device-1").await, Some(0));
    sub.write_all(&subscribe("tls/#")).await.unwrap();
    assert_eq!(read_packet(&mut sub).await.expect("SUBACK").0, 0x90);
    publish_tcp(plain, "tls/t", b"over tls").await;
    expect_publish(&mut sub, b"over tls").await;

    // No certificate, or one of another CA: no CONNACK, the handshake fails.
    for client in [None, Some(certs.join("other-client"))] {
        let cfg = client_config(&ca, client.as_deref());
        if let Ok(mut s) = tls_connect(mtls, cfg).await {
            assert_eq!(
                connect_code(&mut s, "intruder").await,
                None,
                "refused certificate {client:?} got a CONNACK"
            );
        }
    }
    // A client that does not trust the server's CA cannot connect either.
    let distrust = client_config(&certs.join("other-ca.pem"), None);
    assert!(tls_connect(mtls, distrust).await.is_err());

    // Where the certificate is optional, a client without one is anonymous: refused
    // with return code 5 (not authorized), while one with a certificate is in.
    let mut anon = tls_connect(optional, client_config(&ca, None))
        .await
        .expect("handshake without certificate");
    assert_eq!(connect_code(&mut anon, "anon").await, Some(5));
    let mut named = tls_connect(optional, good).await.expect("handshake");
    assert_eq!(connect_code(&mut named, "named").await, Some(0));
}

#[tokio::test]
async fn certificate_rotation_keeps_connected_clients() {
    let dir = Broker::temp_dir();
    let certs = generate_certs(&dir);
    let ca = certs.join("ca.pem");
    let config = format!("{PLAIN}\n{}\n{LOG}", tls_listener("tls", "tls", &certs, ""));
    let broker = Broker::start_config_in(dir, &config);
    let tls = broker.listener_addr("tls");
    let plain = broker.listener_addr("plain");

    let mut old = tls_connect(tls, client_config(&ca, None)).await.unwrap();
    assert_eq!(connect_code(&mut old, "before-rotation").await, Some(0));
    old.write_all(&subscribe("rot/#")).await.unwrap();
    assert_eq!(read_packet(&mut old).await.unwrap().0, 0x90);

    // Replace certificate and key with ones of another CA (written beside, then renamed,
    // as a certificate manager does).
    for (from, to) in [
        ("other-server.key", "server.key"),
        ("other-server.pem", "server.pem"),
    ] {
        let tmp = certs.join(format!("{to}.new"));
        std::fs::copy(certs.join(from), &tmp).unwrap();
        std::fs::rename(&tmp, certs.join(to)).unwrap();
    }
    let other = client_config(&certs.join("other-ca.pem"), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut new = loop {
        match tls_connect(tls, other.clone()).await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("new certificate not served within 10 s: {e}"),
        }
    };
    assert_eq!(connect_code(&mut new, "after-rotation").await, Some(0));
    assert!(
        tls_connect(tls, client_config(&ca, None)).await.is_err(),
        "the old certificate is still served"
    );
    // The client connected before the rotation still works.
    publish_tcp(plain, "rot/t", b"still here").await;
    expect_publish(&mut old, b"still here").await;

    // SIGHUP re-reads the files too (same files here: the reload must succeed).
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(broker.pid().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    while broker
        .logs()
        .iter()
        .filter(|l| l.contains("TLS certificates reloaded"))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no reload after SIGHUP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish_tcp(plain, "rot/t", b"after hup").await;
    expect_publish(&mut old, b"after hup").await;
}

/// A WebSocket request for `path` offering subprotocol `mqtt`.
fn ws_request(url: &str) -> tungstenite::handshake::client::Request {
    let mut r = url.into_client_request().unwrap();
    r.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    r
}

/// Drives an MQTT session over a WebSocket: the CONNECT cut over three frames, SUBSCRIBE
/// and PINGREQ in one frame; what comes back is parsed across frame boundaries.
async fn ws_session<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, plain: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connect = raw::connect_v311("ws-client", true, 30);
    let (a, rest) = connect.split_at(3);
    let (b, c) = rest.split_at(5);
    for part in [a, b, c] {
        ws.send(Message::Binary(Bytes::copy_from_slice(part)))
            .await
            .unwrap();
    }
    let mut both = subscribe("ws/#");
    both.extend_from_slice(&[0xc0, 0x00]);
    ws.send(Message::Binary(both.into())).await.unwrap();

    let mut stream = Vec::new();
    let mut packets = Vec::new();
    let mut published = false;
    let deadline = Instant::now() + WAIT;
    while !packets
        .iter()
        .any(|(f, _): &(u8, Vec<u8>)| f & 0xf0 == 0x30)
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = timeout(left, ws.next())
            .await
            .expect("WebSocket message in time")
            .expect("stream open")
            .expect("WebSocket message");
        if let Message::Binary(b) = msg {
            stream.extend_from_slice(&b);
        }
        while let Some((first, body, used)) = split_packet(&stream) {
            packets.push((first, body));
            stream.drain(..used);
        }
        let kinds: Vec<u8> = packets.iter().map(|(f, _)| *f).collect();
        if !published && kinds.contains(&0x90) && kinds.contains(&0xd0) {
            published = true;
            publish_tcp(plain, "ws/t", b"to the browser").await;
        }
    }
    let kinds: Vec<u8> = packets.iter().map(|(f, _)| f & 0xf0).collect();
    assert_eq!(kinds, vec![0x20, 0x90, 0xd0, 0x30]);
    assert!(packets[3].1.ends_with(b"to the browser"));
}

/// One complete packet at the front of `buf`: (first byte, body, bytes used).
fn split_packet(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let first = *buf.first()?;
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let body = buf.get(i..i + len)?.to_vec();
    Some((first, body, i + len))
}

#[tokio::test]
async fn websocket_packets_cut_across_frames() {
    let config = format!(
        "{PLAIN}\n[[listener]]\nname = \"ws\"\nkind = \"ws\"\nbind = \"127.0.0.1:0\"\n\
         path = \"/mqtt\"\n\n{LOG}"
    );
    let broker = Broker::start_config_in(Broker::temp_dir(), &config);
    let ws_addr = broker.listener_addr("ws");
    let plain = broker.listener_addr("plain");
    let tcp = TcpStream::connect(ws_addr).await.unwrap();
    let (mut ws, resp) =
        tokio_tungstenite::client_async(ws_request(&format!("ws://{ws_addr}/mqtt")), tcp)
            .await
            .expect("WebSocket upgrade");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "mqtt",
        "subprotocol echoed"
    );
    ws_session(&mut ws, plain).await;

    // Wrong path: 404; a subprotocol other than mqtt: 400; a text frame: closed.
    let tcp = TcpStream::connect(ws_addr).await.unwrap();
    match tokio_tungstenite::client_async(ws_request(&format!("ws://{ws_addr}/other")), tcp).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 404),
        other => panic!("expected 404, got {other:?}"),
    }
    let tcp = TcpStream::connect(ws_addr).await.unwrap();
    let mut r = format!("ws://{ws_addr}/mqtt")
        .into_client_request()
        .unwrap();
    r.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("chat"));
    match tokio_tungstenite::client_async(r, tcp).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
        other => panic!("expected 400, got {other:?}"),
    }
    let tcp = TcpStream::connect(ws_addr).await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(ws_request(&format!("ws://{ws_addr}/mqtt")), tcp)
            .await
            .unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    let end = timeout(WAIT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "a text frame must close the connection");
}

#[tokio::test]
async fn secure_websocket_round_trip() {
    let dir = Broker::temp_dir();
    let certs = generate_certs(&dir);
    let config = format!("{PLAIN}\n{}\n{LOG}", tls_listener("wss", "wss", &certs, ""));
    let broker = Broker::start_config_in(dir, &config);
    let wss = broker.listener_addr("wss");
    let plain = broker.listener_addr("plain");
    let tls = tls_connect(wss, client_config(&certs.join("ca.pem"), None))
        .await
        .expect("TLS handshake");
    let (mut ws, resp) = tokio_tungstenite::client_async(ws_request("wss://localhost/mqtt"), tls)
        .await
        .expect("WebSocket upgrade over TLS");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "mqtt"
    );
    ws_session(&mut ws, plain).await;
}

#[tokio::test]
async fn listener_accepts_only_its_protocol_versions() {
    let config = format!(
        "[[listener]]\nname = \"v5only\"\nbind = \"127.0.0.1:0\"\nprotocols = [\"5\"]\n\n{LOG}"
    );
    let broker = Broker::start_config_in(Broker::temp_dir(), &config);
    let mut s = raw::connect_tcp(&broker).await;
    assert_eq!(
        connect_code(&mut s, "old").await,
        Some(1),
        "3.1.1 refused with 1"
    );
    let _v5 = raw::connect_v5(&broker, "new").await;
}

/// A client that opens a TLS or WebSocket connection and never completes the handshake is
/// closed at `connect_timeout`, like one that never sends CONNECT.
#[tokio::test]
async fn silent_handshakes_are_closed_at_the_connect_deadline() {
    let dir = Broker::temp_dir();
    let certs = generate_certs(&dir);
    let config = format!(
        "{}\n[[listener]]\nname = \"ws\"\nkind = \"ws\"\nbind = \"127.0.0.1:0\"\n\n\
         [mqtt]\nconnect_timeout = 1\n\n{LOG}",
        tls_listener("tls", "tls", &certs, "")
    );
    let broker = Broker::start_config_in(dir, &config);
    for name in ["tls", "ws"] {
        let mut s = TcpStream::connect(broker.listener_addr(name))
            .await
            .unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 64];
        let closed = timeout(Duration::from_secs(5), async {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{name}: silent handshake not closed");
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{name}: closed after {:?}",
            t.elapsed()
        );
    }
}
