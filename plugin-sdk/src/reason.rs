//! MQTT 5 reason codes a plugin commonly answers with (OASIS MQTT 5.0, section 2.4). The
//! broker maps them to the nearest MQTT 3.x return code for 3.x clients.

use crate::types::ReasonCode;

/// 0x80 Unspecified error.
pub const UNSPECIFIED_ERROR: ReasonCode = 0x80;
/// 0x83 Implementation specific error.
pub const IMPLEMENTATION_SPECIFIC_ERROR: ReasonCode = 0x83;
/// 0x86 Bad User Name or Password (CONNACK; 3.x return code 4).
pub const BAD_USER_NAME_OR_PASSWORD: ReasonCode = 0x86;
/// 0x87 Not authorized.
pub const NOT_AUTHORIZED: ReasonCode = 0x87;
/// 0x89 Server busy.
pub const SERVER_BUSY: ReasonCode = 0x89;
/// 0x8A Banned (CONNACK).
pub const BANNED: ReasonCode = 0x8A;
/// 0x8C Bad authentication method.
pub const BAD_AUTHENTICATION_METHOD: ReasonCode = 0x8C;
/// 0x90 Topic Name invalid.
pub const TOPIC_NAME_INVALID: ReasonCode = 0x90;
/// 0x96 Message rate too high (DISCONNECT).
pub const MESSAGE_RATE_TOO_HIGH: ReasonCode = 0x96;
/// 0x97 Quota exceeded.
pub const QUOTA_EXCEEDED: ReasonCode = 0x97;
/// 0x98 Administrative action (DISCONNECT).
pub const ADMINISTRATIVE_ACTION: ReasonCode = 0x98;
/// 0x99 Payload format invalid.
pub const PAYLOAD_FORMAT_INVALID: ReasonCode = 0x99;
