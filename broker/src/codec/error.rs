//! Codec errors, split by cause, and the one mapping from a decode error to the MQTT 5 reason
//! code the server answers with.

use super::types::{ProtocolVersion, ReasonCode};

/// Why bytes from the network are not a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes break the packet format (MQTT 5 §1.2 "Malformed Packet").
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Well-formed bytes that break a protocol rule (MQTT 5 §1.2 "Protocol Error").
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The whole packet, fixed header included, exceeds the maximum packet size.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Size of the whole packet.
        size: usize,
        /// The limit it broke.
        max: u32,
    },
    /// A known protocol name with a protocol level this server does not speak.
    #[error("unsupported protocol level {level}")]
    UnsupportedProtocolVersion {
        /// The protocol level byte of the CONNECT.
        level: u8,
    },
    /// A Topic Alias of 0 (MQTT-3.3.2-8), answered with 0x94 Topic Alias invalid.
    #[error("topic alias 0")]
    TopicAliasZero,
    /// The first packet of a connection was not CONNECT (MQTT-3.1.0-1): close without answer.
    #[error("first packet is not CONNECT")]
    NotConnect,
    /// A field repeated more often than this server accepts in one packet (User
    /// Properties, topic filters): answered with 0x97 Quota exceeded.
    #[error("over a limit of this server: {0}")]
    OverLimit(&'static str),
}

impl DecodeError {
    /// The reason code to put in a CONNACK or DISCONNECT about this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::Malformed(_) => ReasonCode::MalformedPacket,
            DecodeError::Protocol(_) | DecodeError::NotConnect => ReasonCode::ProtocolError,
            DecodeError::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::TopicAliasZero => ReasonCode::TopicAliasInvalid,
            DecodeError::OverLimit(_) => ReasonCode::QuotaExceeded,
            DecodeError::UnsupportedProtocolVersion { .. } => {
                ReasonCode::UnsupportedProtocolVersion
            }
        }
    }
}

/// A failed first packet: the error, and the protocol version if the CONNECT got far enough
/// to name a known one, so the server can answer in that version (a v5 CONNACK with a reason
/// code) before closing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct ConnectError {
    /// The version named by the CONNECT, if its protocol name and level were read and known.
    pub version: Option<ProtocolVersion>,
    /// What was wrong.
    pub error: DecodeError,
}

/// Why a packet cannot be encoded for the peer's protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string or binary field longer than 65,535 bytes.
    #[error("{field} is {len} bytes, more than 65535")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The remaining length exceeds 268,435,455, the largest a packet can have.
    #[error("remaining length {len} exceeds 268435455")]
    PacketTooLarge {
        /// The remaining length the packet would need.
        len: usize,
    },
    /// The packet does not exist in this protocol version (AUTH to a 3.x client).
    #[error("{packet} cannot be sent to an MQTT {version} peer")]
    NotInVersion {
        /// The packet's name.
        packet: &'static str,
        /// The peer's version.
        version: ProtocolVersion,
    },
    /// The reason code is not one this packet may carry (MQTT 5 §2.4).
    #[error("reason code {code:?} is not allowed in {packet}")]
    InvalidReasonCode {
        /// The packet's name.
        packet: &'static str,
        /// The offending code.
        code: ReasonCode,
    },
    /// A value the receiving decoder would reject (e.g. a string containing U+0000).
    #[error("invalid value: {0}")]
    InvalidValue(&'static str),
}
