//! A small PostgreSQL client over `std::net::TcpStream`: startup, password
//! authentication (SCRAM-SHA-256, md5, cleartext), simple queries, and a pipeline of
//! parameterised statements run as one implicit transaction. Messages are built and
//! parsed by the `postgres-protocol` crate; this module does the I/O around them.
//!
//! It knows nothing of the plugin SDK, so it compiles and is tested natively against a
//! real server. Every wait on the network is bounded, because the broker's time budget
//! cannot interrupt a guest blocked in a host socket call: each operation takes a
//! deadline, and every connect, read and write gets the time left as its socket
//! timeout. On wasm32-wasip2, std's socket timeouts (`connect_timeout`,
//! `set_read_timeout`, `set_write_timeout`) are emulated by wasi-libc and honoured.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, Header, Message};
use postgres_protocol::message::frontend;
use postgres_protocol::{IsNull, Oid};

/// The largest backend message accepted. The answers this client asks for are small
/// (completions, errors, notices); a length above this is a broken or hostile server,
/// and refusing it keeps a bogus header from reserving gigabytes.
const MAX_MESSAGE: usize = 1 << 20;

/// Bytes of COPY data per CopyData message (and per write).
const COPY_CHUNK: usize = 256 * 1024;

/// Where and as whom to connect.
#[derive(Clone)]
pub struct Params {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Its password (none: only `trust` authentication works).
    pub password: Option<String>,
    /// Database to connect to.
    pub database: String,
}

impl fmt::Debug for Params {
    /// Everything but the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Params")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// Why a request failed, split by what it means for the connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No TCP connection could be opened (refused, unreachable, not in the sidecar's
    /// `network` list, name lookup failed). `addr` is what was tried.
    Connect {
        /// `host:port` as configured.
        addr: String,
        /// The last error.
        source: io::Error,
    },
    /// The connection failed while in use (reset, broken pipe).
    Io(io::Error),
    /// The server closed the connection.
    Closed,
    /// No complete answer within the time bound; `what` says which step.
    Timeout(&'static str),
    /// The server sent something this client cannot accept (malformed, oversized or
    /// out-of-order message, failed SCRAM verification).
    Protocol(String),
    /// The server asked for an authentication method this client does not do, or for a
    /// password when none is configured.
    Auth(String),
    /// The server answered with an ErrorResponse.
    Server(ServerError),
}

impl Error {
    /// Whether the connection can serve the next request: true only after a server
    /// error answered in full (the server is back at ReadyForQuery, idle).
    pub fn connection_usable(&self) -> bool {
        matches!(self, Error::Server(e) if e.idle)
    }

    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { addr, source } => {
                write!(f, "cannot connect to PostgreSQL at {addr}: {source}")?;
                if source.kind() == io::ErrorKind::PermissionDenied {
                    // What the broker answers for an address missing from `network`.
                    write!(f, " (is it in the sidecar's `network` list?)")?;
                }
                Ok(())
            }
            Error::Io(e) => write!(f, "PostgreSQL connection failed: {e}"),
            Error::Closed => write!(f, "PostgreSQL closed the connection"),
            Error::Timeout(what) => write!(f, "PostgreSQL did not answer in time ({what})"),
            Error::Protocol(why) => write!(f, "PostgreSQL protocol error: {why}"),
            Error::Auth(why) => write!(f, "PostgreSQL authentication: {why}"),
            Error::Server(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

/// An ErrorResponse: severity, SQLSTATE and message (the fields a log needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC`.
    pub severity: String,
    /// SQLSTATE, five characters (`23514`, `28P01`...).
    pub code: String,
    /// The primary message.
    pub message: String,
    /// Whether the server went back to idle after it (the connection is usable).
    idle: bool,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgreSQL {} {}: {}",
            self.severity, self.code, self.message
        )
    }
}

/// Reads severity, code and message out of ErrorResponse fields. Missing fields stay
/// empty and non-UTF-8 bytes are replaced: the text is only logged.
fn server_error(mut fields: ErrorFields<'_>) -> Result<ServerError, Error> {
    let mut e = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        idle: false,
    };
    while let Some(field) = fields.next().map_err(malformed)? {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            // 'V' is the untranslated severity (9.6+); 'S' the localized one.
            b'V' => e.severity = value,
            b'S' if e.severity.is_empty() => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            _ => {}
        }
    }
    Ok(e)
}

fn malformed(e: io::Error) -> Error {
    Error::Protocol(e.to_string())
}

/// A statement parameter in binary format.
#[derive(Debug, Clone, PartialEq)]
pub enum Param<'a> {
    /// SQL NULL.
    Null,
    /// `text`: UTF-8 without NUL characters (PostgreSQL refuses them).
    Text(&'a str),
    /// `bytea`.
    Bytea(&'a [u8]),
    /// `int2`.
    Int2(i16),
    /// `timestamptz`: microseconds since 2000-01-01 00:00 UTC.
    Timestamptz(i64),
    /// `jsonb`: the JSON text (encoded with the binary format's version byte).
    Jsonb(&'a str),
}

impl Param<'_> {
    fn encode(&self, buf: &mut BytesMut) -> IsNull {
        use postgres_protocol::types;
        match self {
            Param::Null => return IsNull::Yes,
            Param::Text(s) => types::text_to_sql(s, buf),
            Param::Bytea(b) => types::bytea_to_sql(b, buf),
            Param::Int2(v) => types::int2_to_sql(*v, buf),
            Param::Timestamptz(v) => types::timestamp_to_sql(*v, buf),
            Param::Jsonb(s) => {
                // jsonb's binary format: version 1, then the JSON text.
                buf.extend_from_slice(&[1]);
                buf.extend_from_slice(s.as_bytes());
            }
        }
        IsNull::No
    }
}

/// `rows` (each a row's fields in the order of the COPY's columns) as a `COPY ... FROM
/// STDIN (FORMAT binary)` stream: the signature, each row's fields in their binary format
/// (the same bytes as binary parameters), and the trailer. The server reads them as the
/// exact types of the columns: no casts, unlike parameters.
pub fn copy_binary<'a, const N: usize>(rows: impl IntoIterator<Item = [Param<'a>; N]>) -> BytesMut {
    let mut out = BytesMut::with_capacity(4096);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    // Flags, then the length of the header extension: none.
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    let fields = i16::try_from(N).unwrap_or(i16::MAX).to_be_bytes();
    for row in rows {
        out.extend_from_slice(&fields);
        for p in &row {
            let at = out.len();
            out.extend_from_slice(&0i32.to_be_bytes());
            let len = match p.encode(&mut out) {
                IsNull::Yes => -1,
                IsNull::No => i32::try_from(out.len() - at - 4).unwrap_or(i32::MAX),
            };
            if let Some(slot) = out.get_mut(at..at + 4) {
                slot.copy_from_slice(&len.to_be_bytes());
            }
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// One parameterised statement of a pipeline.
pub struct Statement<'a> {
    /// SQL text with `$1`, `$2`... placeholders.
    pub sql: &'a str,
    /// Parameter types (OIDs), repeated as often as needed to cover `params`: one row's
    /// types for a multi-row INSERT.
    pub types: &'a [Oid],
    /// The parameters.
    pub params: Vec<Param<'a>>,
}

/// An open, authenticated connection, idle between requests.
pub struct Client {
    stream: TcpStream,
    read: BytesMut,
    write: BytesMut,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.stream.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Opens a connection to the first address of `params.host` that accepts one, logs
    /// in and waits until the server is ready for queries, all before `deadline`.
    pub fn connect(params: &Params, deadline: Instant) -> Result<Client, Error> {
        let addr = format!("{}:{}", params.host, params.port);
        let addrs: Vec<SocketAddr> = (params.host.as_str(), params.port)
            .to_socket_addrs()
            .map_err(|source| Error::Connect {
                addr: addr.clone(),
                source,
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
        let mut stream = None;
        for a in &addrs {
            let left = remaining(deadline).ok_or(Error::Timeout("connect"))?;
            match TcpStream::connect_timeout(a, left) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some(stream) = stream else {
            return Err(Error::Connect { addr, source: last });
        };
        // Requests are written whole and answers awaited: no small-packet delay wanted.
        stream.set_nodelay(true).map_err(Error::Io)?;
        let mut client = Client {
            stream,
            read: BytesMut::with_capacity(8192),
            write: BytesMut::with_capacity(8192),
        };
        client.startup(params, deadline)?;
        Ok(client)
    }

    fn startup(&mut self, params: &Params, deadline: Instant) -> Result<(), Error> {
        let options = [
            ("user", params.user.as_str()),
            ("database", params.database.as_str()),
            ("application_name", "sandpiper-postgres-sink"),
            // Text parameters are sent as UTF-8 whatever the server's default is.
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(options, &mut self.write).map_err(malformed)?;
        self.flush(deadline, "startup")?;
        self.authenticate(params, deadline)?;
        // ParameterStatus, BackendKeyData, notices: then ReadyForQuery.
        loop {
            match self.receive(deadline, "startup")? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    return Err(Error::Server(server_error(body.fields())?));
                }
                Message::ParameterStatus(_)
                | Message::BackendKeyData(_)
                | Message::NoticeResponse(_) => {}
                _ => return Err(unexpected("startup")),
            }
        }
    }

    /// Answers the server's authentication requests until AuthenticationOk.
    fn authenticate(&mut self, params: &Params, deadline: Instant) -> Result<(), Error> {
        let password = || {
            params.password.as_deref().ok_or_else(|| {
                Error::Auth("the server asks for a password; none is configured".into())
            })
        };
        loop {
            match self.receive(deadline, "authentication")? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.write)
                        .map_err(malformed)?;
                    self.flush(deadline, "authentication")?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)
                        .map_err(malformed)?;
                    self.flush(deadline, "authentication")?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram = false;
                    while let Some(m) = mechanisms.next().map_err(malformed)? {
                        scram |= m == SCRAM_SHA_256;
                    }
                    if !scram {
                        return Err(Error::Auth(
                            "the server offers no SASL mechanism this client knows (SCRAM-SHA-256)"
                                .into(),
                        ));
                    }
                    self.scram(password()?, deadline)?;
                }
                Message::ErrorResponse(body) => {
                    return Err(Error::Server(server_error(body.fields())?));
                }
                Message::NoticeResponse(_) => {}
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationGssContinue(_)
                | Message::AuthenticationSspi => {
                    return Err(Error::Auth(
                        "the server asks for Kerberos, GSSAPI or SSPI; this client does \
                         SCRAM-SHA-256, md5 and password"
                            .into(),
                    ));
                }
                _ => return Err(unexpected("authentication")),
            }
        }
    }

    /// SCRAM-SHA-256 (RFC 7677) without channel binding (the connection is not TLS).
    /// The server's final message proves it knows the password too; `finish` checks it.
    fn scram(&mut self, password: &str, deadline: Instant) -> Result<(), Error> {
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.write)
            .map_err(malformed)?;
        self.flush(deadline, "authentication")?;
        let Message::AuthenticationSaslContinue(body) = self.expect_auth(deadline)? else {
            return Err(unexpected("SCRAM server-first message"));
        };
        scram.update(body.data()).map_err(malformed)?;
        frontend::sasl_response(scram.message(), &mut self.write).map_err(malformed)?;
        self.flush(deadline, "authentication")?;
        let Message::AuthenticationSaslFinal(body) = self.expect_auth(deadline)? else {
            return Err(unexpected("SCRAM server-final message"));
        };
        scram
            .finish(body.data())
            .map_err(|e| Error::Protocol(format!("SCRAM server verification failed: {e}")))
    }

    /// The next message during SCRAM, with an ErrorResponse turned into the error.
    fn expect_auth(&mut self, deadline: Instant) -> Result<Message, Error> {
        match self.receive(deadline, "authentication")? {
            Message::ErrorResponse(body) => Err(Error::Server(server_error(body.fields())?)),
            m => Ok(m),
        }
    }

    /// Runs `sql` with the simple query protocol (one statement or several separated by
    /// semicolons) and waits for its end before `deadline`, ignoring any rows.
    pub fn simple_query(&mut self, sql: &str, deadline: Instant) -> Result<(), Error> {
        frontend::query(sql, &mut self.write).map_err(malformed)?;
        self.flush(deadline, "query")?;
        let mut failed = None;
        loop {
            match self.receive(deadline, "query")? {
                Message::ReadyForQuery(body) => {
                    return finish(failed, body.status());
                }
                Message::ErrorResponse(body) => failed = Some(server_error(body.fields())?),
                Message::CommandComplete(_)
                | Message::EmptyQueryResponse
                | Message::RowDescription(_)
                | Message::DataRow(_)
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_)
                | Message::NotificationResponse(_) => {}
                _ => return Err(unexpected("query")),
            }
        }
    }

    /// Runs `sql` (one query) with the simple query protocol and returns the first column
    /// of its first row as text (`None` for no row or NULL), before `deadline`.
    pub fn query_scalar(&mut self, sql: &str, deadline: Instant) -> Result<Option<String>, Error> {
        frontend::query(sql, &mut self.write).map_err(malformed)?;
        self.flush(deadline, "query")?;
        let mut failed = None;
        let mut value = None;
        let mut first = true;
        loop {
            match self.receive(deadline, "query")? {
                Message::ReadyForQuery(body) => {
                    finish(failed, body.status())?;
                    return Ok(value);
                }
                Message::ErrorResponse(body) => failed = Some(server_error(body.fields())?),
                Message::DataRow(row) => {
                    if std::mem::take(&mut first) {
                        let range = row.ranges().next().map_err(malformed)?.flatten();
                        value = range
                            .and_then(|r| row.buffer().get(r))
                            .map(|b| String::from_utf8_lossy(b).into_owned());
                    }
                }
                Message::CommandComplete(_)
                | Message::EmptyQueryResponse
                | Message::RowDescription(_)
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_)
                | Message::NotificationResponse(_) => {}
                _ => return Err(unexpected("query")),
            }
        }
    }

    /// Runs `sql`, a `COPY ... FROM STDIN`, sending `data` (see [`copy_binary`]) once the
    /// server is ready for it, before `deadline`. A COPY is one statement: all rows or
    /// none. Returns the number of rows the server reported (`COPY n`).
    pub fn copy_in(&mut self, sql: &str, data: &[u8], deadline: Instant) -> Result<u64, Error> {
        frontend::query(sql, &mut self.write).map_err(malformed)?;
        self.flush(deadline, "copy")?;
        let mut failed = None;
        loop {
            match self.receive(deadline, "copy")? {
                Message::CopyInResponse(_) => break,
                // Refused before any data (no such table, a column missing).
                Message::ErrorResponse(body) => failed = Some(server_error(body.fields())?),
                Message::ReadyForQuery(body) => {
                    finish(failed, body.status())?;
                    return Err(unexpected("copy"));
                }
                Message::NoticeResponse(_)
                | Message::ParameterStatus(_)
                | Message::NotificationResponse(_) => {}
                _ => return Err(unexpected("copy")),
            }
        }
        for chunk in data.chunks(COPY_CHUNK) {
            let message = frontend::CopyData::new(chunk).map_err(malformed)?;
            message.write(&mut self.write);
            if self.write.len() >= COPY_CHUNK {
                self.flush(deadline, "copy")?;
            }
        }
        frontend::copy_done(&mut self.write);
        self.flush(deadline, "copy")?;
        // An error in the data ends the copy at once; the server drops the rest.
        let (rows, failed, status) = self.until_ready(deadline)?;
        finish(failed, status)?;
        Ok(rows)
    }

    /// Runs `statements` in one pipeline closed by a single Sync: outside an explicit
    /// transaction block, the server runs everything before a Sync as one implicit
    /// transaction, committed at the Sync if every statement succeeded and rolled back
    /// otherwise (PostgreSQL protocol, "Extended Query" and "Pipelining"). One round trip.
    /// Returns the number of rows the statements reported (`INSERT 0 n`), or an error
    /// if the answer is not complete by `deadline`.
    pub fn execute_atomically(
        &mut self,
        statements: &[Statement<'_>],
        deadline: Instant,
    ) -> Result<u64, Error> {
        for s in statements {
            self.queue(s)?;
        }
        frontend::sync(&mut self.write);
        self.flush(deadline, "statement")?;
        let (rows, failed, status) = self.until_ready(deadline)?;
        finish(failed, status)?;
        Ok(rows)
    }

    /// Runs each of `statements` in a transaction of its own (a Sync after each), still
    /// in one round trip: a statement the server refuses does not undo the others.
    /// Returns, per statement, its row count or the server's error.
    pub fn execute_each(
        &mut self,
        statements: &[Statement<'_>],
        deadline: Instant,
    ) -> Result<Vec<Result<u64, ServerError>>, Error> {
        for s in statements {
            self.queue(s)?;
            frontend::sync(&mut self.write);
        }
        self.flush(deadline, "statement")?;
        let mut out = Vec::with_capacity(statements.len());
        for _ in statements {
            let (rows, failed, status) = self.until_ready(deadline)?;
            out.push(match finish(failed, status) {
                Ok(()) => Ok(rows),
                Err(Error::Server(e)) if e.idle => Err(e),
                Err(e) => return Err(e),
            });
        }
        Ok(out)
    }

    /// Adds Parse, Bind and Execute of `s` (unnamed statement and portal, binary
    /// parameters) to the pending request.
    fn queue(&mut self, s: &Statement<'_>) -> Result<(), Error> {
        let types = s.types.iter().copied().cycle().take(s.params.len());
        if let Err(e) = frontend::parse("", s.sql, types, &mut self.write) {
            self.write.clear();
            return Err(malformed(e));
        }
        let bound = frontend::bind(
            "",
            "",
            // One format code applies to every parameter: binary.
            [1],
            &s.params,
            |p, buf| Ok(p.encode(buf)),
            // Results (none for INSERT) in binary.
            [1],
            &mut self.write,
        );
        if let Err(e) = bound {
            self.write.clear();
            return Err(Error::Protocol(match e {
                frontend::BindError::Conversion(e) => e.to_string(),
                frontend::BindError::Serialization(e) => e.to_string(),
            }));
        }
        frontend::execute("", 0, &mut self.write).map_err(malformed)
    }

    /// Reads the answers to statements up to ReadyForQuery: the rows they reported,
    /// the error if one failed, and the transaction status.
    fn until_ready(&mut self, deadline: Instant) -> Result<(u64, Option<ServerError>, u8), Error> {
        let mut rows = 0u64;
        let mut failed = None;
        loop {
            match self.receive(deadline, "statement")? {
                Message::ReadyForQuery(body) => return Ok((rows, failed, body.status())),
                Message::CommandComplete(body) => {
                    let tag = body.tag().map_err(malformed)?;
                    // "INSERT oid rows", "UPDATE rows"...: the count is the last word.
                    let n = tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok());
                    rows = rows.saturating_add(n.unwrap_or(0));
                }
                Message::ErrorResponse(body) => failed = Some(server_error(body.fields())?),
                Message::ParseComplete
                | Message::BindComplete
                | Message::NoData
                | Message::EmptyQueryResponse
                | Message::DataRow(_)
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_)
                | Message::NotificationResponse(_) => {}
                _ => return Err(unexpected("statement")),
            }
        }
    }

    /// Says goodbye (Terminate) without waiting; errors are irrelevant at this point.
    pub fn close(mut self) {
        frontend::terminate(&mut self.write);
        let deadline = Instant::now() + Duration::from_millis(100);
        let _ = self.flush(deadline, "terminate");
    }

    /// Writes the pending request, all of it, before `deadline`.
    fn flush(&mut self, deadline: Instant, what: &'static str) -> Result<(), Error> {
        let mut sent = 0;
        while sent < self.write.len() {
            let left = remaining(deadline).ok_or(Error::Timeout(what))?;
            self.stream
                .set_write_timeout(Some(left))
                .map_err(Error::Io)?;
            match self
                .stream
                .write(self.write.get(sent..).unwrap_or_default())
            {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(Error::Timeout(what)),
                Err(e) => return Err(Error::Io(e)),
            }
        }
        self.write.clear();
        Ok(())
    }

    /// The next backend message, read before `deadline`.
    fn receive(&mut self, deadline: Instant, what: &'static str) -> Result<Message, Error> {
        loop {
            if let Some(header) = Header::parse(&self.read).map_err(malformed)? {
                // The length counts itself (4 bytes) but not the tag; Header::parse has
                // checked it is at least 4.
                let len = usize::try_from(header.len()).unwrap_or(usize::MAX);
                if len > MAX_MESSAGE {
                    return Err(Error::Protocol(format!(
                        "a message of {len} bytes (tag {:?}) is larger than this client accepts",
                        char::from(header.tag())
                    )));
                }
                if let Some(m) = Message::parse(&mut self.read).map_err(malformed)? {
                    return Ok(m);
                }
            }
            let left = remaining(deadline).ok_or(Error::Timeout(what))?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(Error::Io)?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => self
                    .read
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(Error::Timeout(what)),
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }
}

/// The outcome of a request once ReadyForQuery arrived: its error if any, which leaves
/// the connection usable only if the server is idle again (status `I`, no transaction
/// left open).
fn finish(failed: Option<ServerError>, status: u8) -> Result<(), Error> {
    let idle = status == b'I';
    match failed {
        Some(mut e) => {
            e.idle = idle;
            Err(Error::Server(e))
        }
        None if idle => Ok(()),
        None => Err(Error::Protocol(format!(
            "the server is not idle after the request (transaction status {:?})",
            char::from(status)
        ))),
    }
}

fn unexpected(during: &str) -> Error {
    Error::Protocol(format!("unexpected message during {during}"))
}

/// Time left until `deadline`; none when it has passed. Never zero (a zero socket
/// timeout is refused by std).
fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.checked_duration_since(Instant::now())?;
    (!left.is_zero()).then_some(left)
}

/// A socket timeout: `WouldBlock` on Unix and WASI, `TimedOut` elsewhere.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
