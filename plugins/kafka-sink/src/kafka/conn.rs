//! One connection to a Kafka broker: connect with a timeout, negotiate API versions,
//! and send a request / read its response, every wait bounded by the call's deadline.
//!
//! Framing (Kafka protocol guide): each request and response is an `int32` size followed
//! by that many bytes: the header (api key, version, correlation id, client id; the
//! response header echoes the correlation id), then the message body.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
    ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use super::{Error, MAX_RESPONSE_BYTES};

/// Produce versions this client speaks: 3 (record batch v2) to 12 (13 names topics by id).
const PRODUCE: (i16, i16) = (3, 12);
/// Metadata versions this client speaks: 1 (broker ids, leaders) to 12.
const METADATA: (i16, i16) = (1, 12);

/// Connections given up on while a wait had timed out (see [`Conn`]'s `Drop`).
static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// A request this client sends, and the response it reads. (`kafka_protocol`'s own
/// `Request` trait needs its `broker` feature too: encoding responses, decoding requests.)
pub(super) trait Api: Encodable + HeaderVersion {
    /// The API key.
    const KEY: ApiKey;
    /// What the server answers.
    type Response: Decodable + HeaderVersion;
}

impl Api for ApiVersionsRequest {
    const KEY: ApiKey = ApiKey::ApiVersions;
    type Response = ApiVersionsResponse;
}

impl Api for MetadataRequest {
    const KEY: ApiKey = ApiKey::Metadata;
    type Response = MetadataResponse;
}

impl Api for ProduceRequest {
    const KEY: ApiKey = ApiKey::Produce;
    type Response = ProduceResponse;
}

/// How many connections this instance has abandoned without closing them.
pub fn abandoned_connections() -> usize {
    ABANDONED.load(Ordering::Relaxed)
}

/// An open connection and the API versions agreed with its broker.
pub(super) struct Conn {
    stream: Option<TcpStream>,
    addr: String,
    client_id: StrBytes,
    next_correlation: i32,
    /// Produce version to use.
    pub produce_version: i16,
    /// Metadata version to use.
    pub metadata_version: i16,
    /// A read or write timed out: bytes may still be waiting in the host's send path.
    timed_out: bool,
}

impl Conn {
    /// Connects to `addr` (`host:port`) and asks for the broker's API versions.
    pub fn open(
        addr: &str,
        client_id: &str,
        connect_timeout: Duration,
        deadline: Instant,
    ) -> Result<Conn, Error> {
        let stream = connect(addr, connect_timeout, deadline).map_err(|why| Error::Connect {
            addr: addr.to_owned(),
            why,
        })?;
        let mut conn = Conn {
            stream: Some(stream),
            addr: addr.to_owned(),
            client_id: StrBytes::from_string(client_id.to_owned()),
            next_correlation: 0,
            produce_version: PRODUCE.0,
            metadata_version: METADATA.0,
            timed_out: false,
        };
        // Version 0: every broker since 0.10 answers it, and its answer lists the rest.
        let versions = conn.call(ApiVersionsRequest::default(), 0, deadline, "ApiVersions")?;
        if versions.error_code != 0 {
            return Err(conn.unsupported(format!(
                "ApiVersions answered error {}",
                versions.error_code
            )));
        }
        let pick = |key: ApiKey, (ours_min, ours_max): (i16, i16)| {
            versions
                .api_keys
                .iter()
                .find(|k| k.api_key == key as i16)
                .and_then(|k| {
                    let v = k.max_version.min(ours_max);
                    (v >= k.min_version.max(ours_min)).then_some(v)
                })
        };
        conn.produce_version = pick(ApiKey::Produce, PRODUCE)
            .ok_or_else(|| conn.unsupported(format!("no Produce version in {PRODUCE:?}")))?;
        conn.metadata_version = pick(ApiKey::Metadata, METADATA)
            .ok_or_else(|| conn.unsupported(format!("no Metadata version in {METADATA:?}")))?;
        Ok(conn)
    }

    fn unsupported(&self, why: String) -> Error {
        Error::Unsupported {
            addr: self.addr.clone(),
            why,
        }
    }

    fn protocol(&self, why: impl Into<String>) -> Error {
        Error::Protocol {
            addr: self.addr.clone(),
            why: why.into(),
        }
    }

    /// Sends `request` as `version` and returns the decoded response. The request is
    /// consumed: its record batches are freed once encoded into the frame, so a Produce
    /// request is held in memory once, not twice.
    pub fn call<R: Api>(
        &mut self,
        request: R,
        version: i16,
        deadline: Instant,
        doing: &'static str,
    ) -> Result<R::Response, Error> {
        let correlation = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(self.client_id.clone()));
        let header_version = R::header_version(version);
        let size = header
            .compute_size(header_version)
            .and_then(|h| Ok(h + request.compute_size(version)?))
            .map_err(|e| Error::Encode(format!("{doing} v{version}: {e}")))?;
        let size_field = i32::try_from(size)
            .map_err(|_| Error::Encode(format!("{doing} request of {size} bytes")))?;
        let mut frame = Vec::with_capacity(4 + size);
        frame.extend_from_slice(&size_field.to_be_bytes());
        header
            .encode(&mut frame, header_version)
            .and_then(|()| request.encode(&mut frame, version))
            .map_err(|e| Error::Encode(format!("{doing} v{version}: {e}")))?;
        drop(request);

        self.io(doing, deadline, |s, d| write_all_by(s, &frame, d))?;
        let mut size = [0u8; 4];
        self.io(doing, deadline, |s, d| read_exact_by(s, &mut size, d))?;
        let size = i32::from_be_bytes(size);
        let size = usize::try_from(size)
            .ok()
            .filter(|&n| (4..=MAX_RESPONSE_BYTES).contains(&n))
            .ok_or_else(|| self.protocol(format!("{doing} response size {size}")))?;
        let mut body = vec![0u8; size];
        self.io(doing, deadline, |s, d| read_exact_by(s, &mut body, d))?;

        let mut body = Bytes::from(body);
        let header = ResponseHeader::decode(&mut body, R::Response::header_version(version))
            .map_err(|e| self.protocol(format!("{doing} response header: {e}")))?;
        if header.correlation_id != correlation {
            return Err(self.protocol(format!(
                "{doing} response has correlation id {}, expected {correlation}",
                header.correlation_id
            )));
        }
        R::Response::decode(&mut body, version)
            .map_err(|e| self.protocol(format!("{doing} v{version} response: {e}")))
    }

    /// Runs one read or write on the stream, turning its failure into [`Error::Io`].
    fn io(
        &mut self,
        doing: &'static str,
        deadline: Instant,
        op: impl FnOnce(&mut TcpStream, Instant) -> io::Result<()>,
    ) -> Result<(), Error> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(self.protocol("connection already failed"));
        };
        op(stream, deadline).map_err(|e| {
            let why = match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    self.timed_out = true;
                    "no answer within the call's time budget".to_owned()
                }
                io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
                _ => e.to_string(),
            };
            Error::Io {
                addr: self.addr.clone(),
                doing,
                why,
            }
        })
    }
}

impl Drop for Conn {
    /// On wasip2, closing a socket whose host-side write has not finished waits for that
    /// write (wasmtime-wasi's output stream `drop` flushes), which never happens when the
    /// peer stopped reading; no deadline can interrupt a guest blocked in a host call. So a
    /// connection that timed out is abandoned (its handle leaked) instead of closed; the
    /// host frees it with the instance. [`abandoned_connections`] counts them.
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take()
            && self.timed_out
            && cfg!(target_os = "wasi")
        {
            ABANDONED.fetch_add(1, Ordering::Relaxed);
            std::mem::forget(stream);
        }
    }
}

/// Time left before `deadline`, or a timeout error when none is.
fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(left)
}

/// Connects to the first address of `addr` that answers. On wasip2 `connect_timeout`
/// reports a refused connection as success and leaves the error in `SO_ERROR`, so that is
/// checked too.
fn connect(addr: &str, timeout: Duration, deadline: Instant) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .collect();
    let mut last = "no address".to_owned();
    for a in addrs {
        let wait = match left(deadline) {
            Ok(l) => l.min(timeout),
            Err(e) => return Err(e.to_string()),
        };
        match TcpStream::connect_timeout(&a, wait) {
            Ok(s) => match s.take_error() {
                Ok(None) => {
                    // Small requests go out at once (one request, one response).
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Some(e)) | Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn write_all_by(s: &mut TcpStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        s.set_write_timeout(Some(left(deadline)?))?;
        match s.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_exact_by(s: &mut TcpStream, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        s.set_read_timeout(Some(left(deadline)?))?;
        match s.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = buf.get_mut(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
