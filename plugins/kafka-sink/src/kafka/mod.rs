//! A small Kafka producer: ApiVersions, Metadata and Produce (acks=all) over
//! `std::net::TcpStream`, with the `kafka-protocol` crate for the request and response
//! messages and [`records`] for the record batches.
//!
//! Nothing here uses the plugin SDK: the module builds and is tested natively against a
//! real Kafka-protocol server (`tests/tansu.rs`), and runs unchanged on `wasm32-wasip2`,
//! where `std::net` goes through WASI sockets.
//!
//! Every network wait is bounded: connects by `connect_timeout`, each read and write by
//! what is left of the call's deadline (`SO_RCVTIMEO`/`SO_SNDTIMEO`, which wasi-libc
//! emulates on wasip2). The server's bytes are untrusted: a response frame larger than
//! [`MAX_RESPONSE_BYTES`] is refused before it is read, and decoding errors are errors.
//! One thing is left to the sandbox: `kafka-protocol` reserves room for the element count
//! an array claims, so a hostile server can make decoding exhaust memory; in the plugin
//! that traps the instance, which the broker replaces (and retries the batch).

mod conn;
pub mod partition;
mod producer;
pub mod records;

use std::fmt;
use std::time::Duration;

pub use conn::abandoned_connections;
pub use producer::{Producer, Rejected, Report};
pub use records::Record;

/// The largest response frame read (a Produce or Metadata response is far smaller).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// How the producer connects and waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `host:port` addresses asked for metadata, in order.
    pub bootstrap: Vec<String>,
    /// The client id sent with every request (shows in the server's logs and quotas).
    pub client_id: String,
    /// Longest wait for one TCP connect.
    pub connect_timeout: Duration,
    /// Longest time one `produce` call may take, connects included.
    pub timeout: Duration,
    /// Ask the server to create missing topics (Metadata `allow_auto_topic_creation`; the
    /// server's own setting must allow it too).
    pub auto_create_topics: bool,
    /// Largest record batch (bytes) sent for one partition in one Produce request; more
    /// records for a partition go in further requests.
    pub max_batch_bytes: usize,
    /// Records refused by the server for a reason that retrying cannot fix.
    pub on_rejected: Rejected,
    /// Metadata older than this is refreshed before producing.
    pub metadata_max_age: Duration,
}

/// A record and the Kafka topic it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// A valid Kafka topic name.
    pub topic: String,
    /// The record.
    pub record: Record,
}

/// Why a `produce` call did not deliver everything. Every variant is worth retrying later:
/// the producer has already dropped the connections and metadata involved.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// No TCP connection to `addr`.
    Connect {
        /// The address.
        addr: String,
        /// Why.
        why: String,
    },
    /// Reading or writing failed, or took longer than the deadline.
    Io {
        /// The server's address.
        addr: String,
        /// What was being done ("Produce", "Metadata"...).
        doing: &'static str,
        /// Why.
        why: String,
    },
    /// The server's bytes are not a valid response (or not the one asked for).
    Protocol {
        /// The server's address.
        addr: String,
        /// What is wrong.
        why: String,
    },
    /// The server does not speak a version this client needs.
    Unsupported {
        /// The server's address.
        addr: String,
        /// What is missing.
        why: String,
    },
    /// The cluster's metadata does not allow producing yet (unknown topic, no leader).
    Metadata(String),
    /// The server answered a partition with an error code.
    Kafka {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// Kafka error code.
        code: i16,
        /// Its name and description, or the server's message.
        why: String,
    },
    /// A record cannot be encoded (a field longer than 2 GiB).
    Encode(String),
    /// The call's deadline passed.
    Deadline,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { addr, why } => write!(f, "cannot connect to {addr}: {why}"),
            Error::Io { addr, doing, why } => write!(f, "{doing} to {addr} failed: {why}"),
            Error::Protocol { addr, why } => write!(f, "bad response from {addr}: {why}"),
            Error::Unsupported { addr, why } => write!(f, "{addr} is not usable: {why}"),
            Error::Metadata(why) => write!(f, "metadata: {why}"),
            Error::Kafka {
                topic,
                partition,
                code,
                why,
            } => write!(f, "{topic}/{partition}: error {code}: {why}"),
            Error::Encode(why) => write!(f, "cannot encode: {why}"),
            Error::Deadline => write!(f, "time budget of the call spent"),
        }
    }
}

impl std::error::Error for Error {}
