//! The HTTP/1.1 client: URLs, one request per connection (rustls for `https://`), and a
//! response parser without I/O.

use super::*;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Percent-encodes all but the unreserved characters of RFC 3986 §2.3 (and `/` with
/// `keep_slash`, for a topic name in a path).
pub(super) fn encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// `?k=v&k=v` with the values percent-encoded.
pub(super) fn query(pairs: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        out.push(if out.is_empty() { '?' } else { '&' });
        out += &format!("{k}={}", encode(v, false));
    }
    out
}

/// Where the API is, from a `http://HOST[:PORT][/PATH]` or `https://` URL.
#[derive(Debug)]
pub(super) struct Endpoint {
    tls: bool,
    /// The host to connect to (an IPv6 address without its brackets).
    host: String,
    port: u16,
    /// `HOST[:PORT]` as written, for the `Host` header.
    authority: String,
    /// A path before `/api/v1`, without a trailing `/` (usually empty).
    base: String,
}

pub(super) fn parse_url(url: &str) -> Result<Endpoint, String> {
    let bad = |why: &str| format!("--url {url:?}: {why}");
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(bad("not an http:// or https:// URL")),
    };
    if !rest.bytes().all(|b| b.is_ascii_graphic()) || rest.contains(['?', '#', '@']) {
        return Err(bad("only a host, a port and a path may follow the scheme"));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => (host, Some(port.strip_prefix(':').unwrap_or(port))),
            None => return Err(bad("no ] after the IPv6 address")),
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let port = match port {
        None => Ok(if tls { 443 } else { 80 }),
        Some(p) => p.parse().map_err(|_| bad("bad port")),
    }?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let (host, authority) = (host.to_owned(), authority.to_owned());
    let base = path.trim_end_matches('/').to_owned();
    Ok(Endpoint {
        tls,
        host,
        port,
        authority,
        base,
    })
}

/// The admin API: where it is, with what token, and for https the TLS configuration.
pub(super) struct Api {
    endpoint: Endpoint,
    token: Option<String>,
    tls: Option<Arc<ClientConfig>>,
}

impl Api {
    pub(super) fn new(
        url: Option<String>,
        token: Option<String>,
        cacert: Option<&Path>,
    ) -> Result<Self, Failure> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let url = url.or_else(|| env("SANDPIPER_URL"));
        let endpoint =
            parse_url(url.as_deref().unwrap_or("http://127.0.0.1:8083")).map_err(Failure::Other)?;
        let token = token
            .or_else(|| env("SANDPIPER_TOKEN"))
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        if token
            .as_ref()
            .is_some_and(|t| !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(Failure::Other(
                "the token holds a character a header cannot carry".into(),
            ));
        }
        let tls = if endpoint.tls {
            Some(tls_config(cacert)?)
        } else {
            None
        };
        Ok(Self {
            endpoint,
            token,
            tls,
        })
    }

    /// One request to `/api/v1{path}`: the JSON of a 2xx answer (`null` when empty).
    pub(super) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let (e, body) = (
            &self.endpoint,
            body.map(Value::to_string).unwrap_or_default(),
        );
        let mut request = format!(
            "{method} {}/api/v1{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Accept: application/json\r\nUser-Agent: sandpiper-ctl\r\n",
            e.base, e.authority
        );
        if let Some(token) = &self.token {
            request += &format!("Authorization: Bearer {token}\r\n");
        }
        if !body.is_empty() {
            request += "Content-Type: application/json\r\n";
        }
        if method != "GET" {
            request += &format!("Content-Length: {}\r\n", body.len());
        }
        request += "\r\n";
        request += &body;
        let response = self.send(request.as_bytes())?;
        if !(200..300).contains(&response.status) {
            let mut message = error_message(&response);
            if response.status == 401 && self.token.is_none() {
                message += " (no token: set SANDPIPER_TOKEN or pass --token)";
            }
            return Err(Failure::Status(response.status, message));
        }
        if response.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&response.body)
            .map_err(|e| Failure::Other(format!("the broker's answer is not JSON: {e}")))
    }

    pub(super) fn send(&self, request: &[u8]) -> Result<Response, Failure> {
        let e = &self.endpoint;
        let mut tcp = connect(&e.host, e.port)
            .map_err(|why| Failure::Connect(format!("cannot connect to {}: {why}", e.authority)))?;
        let Some(config) = &self.tls else {
            return exchange(&mut tcp, request, &e.authority);
        };
        let name = ServerName::try_from(e.host.clone())
            .map_err(|_| Failure::Other(format!("{}: not a DNS name or IP address", e.host)))?;
        let mut conn = ClientConnection::new(Arc::clone(config), name)
            .map_err(|why| Failure::Other(format!("TLS: {why}")))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|why| {
                Failure::Connect(format!("TLS handshake with {}: {why}", e.authority))
            })?;
        }
        exchange(&mut StreamOwned::new(conn, tcp), request, &e.authority)
    }
}

/// The TLS configuration for https: the `--cacert` file's certificates are the roots (no
/// public roots are built in).
pub(super) fn tls_config(cacert: Option<&Path>) -> Result<Arc<ClientConfig>, Failure> {
    let Some(path) = cacert else {
        return Err(Failure::Other(
            "an https URL needs --cacert FILE, the PEM CA certificate that signed the broker's \
             certificate (no public roots are built in)"
                .to_owned(),
        ));
    };
    let fail = |why: String| Failure::Other(format!("{}: {why}", path.display()));
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| fail(e.to_string()))? {
        roots
            .add(cert.map_err(|e| fail(e.to_string()))?)
            .map_err(|e| fail(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(fail("no CERTIFICATE section".to_owned()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Other(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connection to the first address of `host` that answers, timeouts set.
pub(super) fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let mut last = None;
    for addr in (host, port).to_socket_addrs().map_err(|e| e.to_string())? {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(s) => {
                s.set_read_timeout(Some(TIMEOUT))
                    .map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(TIMEOUT))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| "no address".to_owned(), |e| e.to_string()))
}

/// Writes the request and reads until `parse_response` has a whole answer.
pub(super) fn exchange<S: Read + Write>(
    stream: &mut S,
    request: &[u8],
    peer: &str,
) -> Result<Response, Failure> {
    let lost = |e: std::io::Error| {
        Failure::Connect(match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => format!("{peer}: no answer in 10 s"),
            _ => format!("{peer}: {e}"),
        })
    };
    stream
        .write_all(request)
        .and_then(|()| stream.flush())
        .map_err(lost)?;
    let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 << 10]);
    loop {
        let eof = match stream.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                false
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // A TLS peer that closes without close_notify: the framing tells a cut answer.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => true,
            Err(e) => return Err(lost(e)),
        };
        if buf.len() > MAX_BODY + MAX_HEAD {
            return Err(Failure::Other(format!("{peer}: an answer over 64 MiB")));
        }
        match parse_response(&buf, eof).map_err(|e| Failure::Other(format!("{peer}: {e}")))? {
            Some(response) => return Ok(response),
            None if eof => return Err(Failure::Other(format!("{peer}: the answer was cut"))),
            None => {}
        }
    }
}

/// An HTTP answer, its body unframed.
#[derive(Debug, PartialEq)]
pub(super) struct Response {
    status: u16,
    reason: String,
    body: Vec<u8>,
}

/// The `error` of an error answer's JSON, else its reason phrase.
pub(super) fn error_message(r: &Response) -> String {
    let json = serde_json::from_slice::<Value>(&r.body).ok();
    match json.as_ref().and_then(|v| v.get("error")?.as_str()) {
        Some(e) => clean(e),
        None if r.reason.is_empty() => "(no message)".to_owned(),
        None => clean(&r.reason),
    }
}

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses an HTTP/1.1 answer from the bytes read so far: `Ok(None)` when more are needed
/// (never with `eof`: no more will come). The body is framed by `Transfer-Encoding:
/// chunked`, else `Content-Length`, else the end of the stream (RFC 9112 §6.3).
pub(super) fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, String> {
    let end = match find(buf, b"\r\n\r\n") {
        Some(end) if end <= MAX_HEAD => end,
        None if buf.len() <= MAX_HEAD && !eof => return Ok(None),
        None if buf.len() <= MAX_HEAD => return Err("the connection closed early".to_owned()),
        _ => return Err("an answer header over 64 KiB".to_owned()),
    };
    let head = String::from_utf8_lossy(buf.get(..end).unwrap_or_default());
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.splitn(3, ' ');
    let (version, code) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    if !version.starts_with("HTTP/1.")
        || code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!(
            "not an HTTP/1.1 answer: {:?}",
            truncate(status_line, 60)
        ));
    }
    let status = code.parse().map_err(|_| "bad status".to_owned())?;
    let reason = words.next().unwrap_or_default().trim().to_owned();
    let (mut chunked, mut encoded, mut length) = (false, false, None);
    for line in lines {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            let last = value.rsplit(',').next().unwrap_or_default();
            chunked = last.trim().eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = Some(value)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| format!("bad Content-Length {value:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Length headers".to_owned());
            }
            length = Some(n);
        }
    }
    let rest = buf.get(end + 4..).unwrap_or_default();
    let body = match length {
        _ if status == 204 || status == 304 => Some(Vec::new()),
        _ if chunked => decode_chunked(rest)?,
        Some(n) if !encoded && n > MAX_BODY => return Err(format!("a body of {n} bytes")),
        Some(n) if !encoded => rest.get(..n).map(<[u8]>::to_vec),
        _ if rest.len() > MAX_BODY => return Err("a body over 64 MiB".to_owned()),
        _ => eof.then(|| rest.to_vec()),
    };
    match body {
        Some(body) => Ok(Some(Response {
            status,
            reason,
            body,
        })),
        None if eof => Err("the connection closed in the middle of the answer".to_owned()),
        None => Ok(None),
    }
}

/// Decodes a chunked body (RFC 9112 §7.1): `Ok(None)` until the last chunk and the trailer
/// section are all there. Chunk extensions and trailer fields are skipped.
pub(super) fn decode_chunked(buf: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let (mut pos, mut chunks, mut total) = (0, Vec::new(), 0usize);
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        let Some(eol) = find(rest, b"\r\n") else {
            return if rest.len() > MAX_HEAD {
                Err("a chunk size line too long".into())
            } else {
                Ok(None)
            };
        };
        let line = String::from_utf8_lossy(rest.get(..eol).unwrap_or_default());
        let size = line.split(';').next().unwrap_or_default().trim();
        if size.is_empty() || size.len() > 15 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("bad chunk size {:?}", truncate(&line, 40)));
        }
        let size = usize::from_str_radix(size, 16).map_err(|e| format!("bad chunk size: {e}"))?;
        pos += eol + 2;
        if size == 0 {
            break;
        }
        total = total.saturating_add(size);
        if total > MAX_BODY {
            return Err("a body over 64 MiB".to_owned());
        }
        match buf.get(pos + size..pos + size + 2) {
            None => return Ok(None),
            Some(b"\r\n") => chunks.push(pos..pos + size),
            Some(_) => return Err("a chunk not followed by CRLF".to_owned()),
        }
        pos += size + 2;
    }
    // The trailer section: field lines up to an empty line.
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        match find(rest, b"\r\n") {
            Some(0) => break,
            Some(eol) => pos += eol + 2,
            None if rest.len() > MAX_HEAD => return Err("a trailer section over 64 KiB".into()),
            None => return Ok(None),
        }
    }
    let mut body = Vec::with_capacity(total);
    for c in chunks {
        body.extend_from_slice(buf.get(c).unwrap_or_default());
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use super::*;

    #[test]
    fn percent_encoding() {
        assert_eq!(encode("a b/é~-._Z9", false), "a%20b%2F%C3%A9~-._Z9");
        assert_eq!(encode("$SYS/a+/#", true), "%24SYS/a%2B/%23");
        let q = query(&[("prefix", "a&b=c".to_owned()), ("limit", "10".to_owned())]);
        assert_eq!(q, "?prefix=a%26b%3Dc&limit=10");
    }

    #[test]
    fn urls() {
        let e = parse_url("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.base.as_str()),
            (false, "127.0.0.1", 8080, "")
        );
        let e = parse_url("https://broker.example/admin/").unwrap();
        assert_eq!(
            (e.port, e.authority.as_str(), e.base.as_str()),
            (443, "broker.example", "/admin")
        );
        let e = parse_url("http://[::1]:9000/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.authority.as_str()),
            ("::1", 9000, "[::1]:9000")
        );
        for bad in [
            "ftp://x",
            "http://",
            "http://h:99999",
            "http://u@h",
            "http://[::1",
            "http://h x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chunked_bodies() {
        let whole = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(decode_chunked(whole).unwrap().unwrap(), b"Wikipedia");
        for cut in 0..whole.len() {
            assert_eq!(decode_chunked(&whole[..cut]).unwrap(), None, "cut at {cut}");
        }
        for bad in [
            &b"zz\r\n"[..],
            b"+1\r\nx\r\n0\r\n\r\n",
            b"1\r\nxy\r\n",
            b"5000000\r\n",
        ] {
            assert!(decode_chunked(bad).is_err());
        }
    }

    #[test]
    fn responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        let r = parse_response(ok, false).unwrap().unwrap();
        assert_eq!(
            (r.status, r.reason.as_str(), r.body.as_slice()),
            (200, "OK", &b"{}"[..])
        );
        assert_eq!(parse_response(&ok[..ok.len() - 1], false).unwrap(), None);
        assert!(parse_response(&ok[..ok.len() - 1], true).is_err());
        let chunked =
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        let r = parse_response(chunked, false).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"{}"[..]));
        let to_eof = b"HTTP/1.0 200 OK\r\n\r\nabc";
        assert_eq!(parse_response(to_eof, false).unwrap(), None);
        assert_eq!(parse_response(to_eof, true).unwrap().unwrap().body, b"abc");
        let bad: [&[u8]; 4] = [
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        ];
        for b in bad {
            assert!(parse_response(b, false).is_err());
        }
        let body = br#"{"error": "no client c1"}"#.to_vec();
        let r = Response {
            status: 404,
            reason: "Not Found".to_owned(),
            body,
        };
        assert_eq!(error_message(&r), "no client c1");
        let r = Response {
            status: 502,
            reason: "Bad Gateway".to_owned(),
            body: b"<h1>".to_vec(),
        };
        assert_eq!(error_message(&r), "Bad Gateway");
    }

    proptest::proptest! {
        /// What the server sends is not trusted: any bytes parse or are refused.
        #[test]
        fn any_answer_parses_or_is_refused(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            eof in proptest::prelude::any::<bool>(),
        ) {
            let _ = parse_response(&raw, eof);
            let _ = decode_chunked(&raw);
            let mut framed = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            framed.extend_from_slice(&raw);
            let _ = parse_response(&framed, eof);
        }
    }
}
