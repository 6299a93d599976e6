//! Bytes ⇄ packets for MQTT 3.1, 3.1.1 and 5.0. No I/O, no async: the connection layer
//! hands in a buffer and gets packets (or "need more bytes") back, and encodes packets into
//! its write buffer.

mod decode;
mod encode;
mod error;
pub mod packet;
mod properties;
mod reader;
mod reason;
pub mod types;

pub use decode::{decode_connect, decode_packet};
pub use encode::{encode_packet, publish_len};
pub use error::{ConnectError, DecodeError, EncodeError};
pub use packet::*;
pub use types::*;
