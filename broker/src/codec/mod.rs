//! Bytes ⇄ packets for MQTT 3.1, 3.1.1 and 5.0. No I/O, no async: the connection layer
//! hands in a buffer and gets packets (or "need more bytes") back, and encodes packets into
//! its write buffer.
//!
//! `packet` and `types` are the model; `decode` frames and parses (through the bounds-checked
//! `reader`), `encode` measures then writes, `properties` owns the MQTT 5 property rules for
//! both directions, `reason` which reason codes each packet may carry and the 3.x return-code
//! mapping, and `error` the error types with their one mapping to reason codes. Round-trip
//! proptests and malformed-packet fixtures live in `tests/`; the fuzz target in
//! `broker/fuzz/`.

mod decode;
mod encode;
mod error;
pub mod packet;
mod properties;
mod property_write;
pub(crate) mod reader;
mod reason;
pub mod types;

pub use decode::{
    decode_connect, decode_connect_limited, decode_packet, decode_packet_limited, packet_len,
};
pub use encode::{encode_packet, encode_publish_head, publish_len};
pub use error::{ConnectError, DecodeError, EncodeError};
pub use packet::*;
pub use reader::DecodeLimits;
pub use reason::{Carrier, Rejection, plugin_refusal};
pub use types::*;

#[cfg(test)]
mod tests;
