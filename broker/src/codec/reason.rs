//! Which reason codes each packet may carry (MQTT 5 §2.4 and the per-packet tables), and the
//! mapping between MQTT 5 reason codes and the MQTT 3.x CONNACK and SUBACK return codes.

use super::types::ReasonCode::{self, *};

/// The packets that carry a reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    ConnAck,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    SubAck,
    UnsubAck,
    Disconnect,
    Auth,
}

impl Carrier {
    /// The packet's name, for errors.
    pub(super) fn name(self) -> &'static str {
        match self {
            Carrier::ConnAck => "CONNACK",
            Carrier::PubAck => "PUBACK",
            Carrier::PubRec => "PUBREC",
            Carrier::PubRel => "PUBREL",
            Carrier::PubComp => "PUBCOMP",
            Carrier::SubAck => "SUBACK",
            Carrier::UnsubAck => "UNSUBACK",
            Carrier::Disconnect => "DISCONNECT",
            Carrier::Auth => "AUTH",
        }
    }

    /// The error for a code this packet may not carry.
    pub(super) fn bad_reason(self) -> &'static str {
        match self {
            Carrier::ConnAck => "reason code not allowed in CONNACK",
            Carrier::PubAck => "reason code not allowed in PUBACK",
            Carrier::PubRec => "reason code not allowed in PUBREC",
            Carrier::PubRel => "reason code not allowed in PUBREL",
            Carrier::PubComp => "reason code not allowed in PUBCOMP",
            Carrier::SubAck => "reason code not allowed in SUBACK",
            Carrier::UnsubAck => "reason code not allowed in UNSUBACK",
            Carrier::Disconnect => "reason code not allowed in DISCONNECT",
            Carrier::Auth => "reason code not allowed in AUTH",
        }
    }

    /// True when MQTT 5 allows `code` in this packet.
    pub fn allows(self, code: ReasonCode) -> bool {
        match self {
            // §3.2.2.2
            Carrier::ConnAck => matches!(
                code,
                Success
                    | UnspecifiedError
                    | MalformedPacket
                    | ProtocolError
                    | ImplementationSpecificError
                    | UnsupportedProtocolVersion
                    | ClientIdentifierNotValid
                    | BadUserNameOrPassword
                    | NotAuthorized
                    | ServerUnavailable
                    | ServerBusy
                    | Banned
                    | BadAuthenticationMethod
                    | TopicNameInvalid
                    | PacketTooLarge
                    | QuotaExceeded
                    | PayloadFormatInvalid
                    | RetainNotSupported
                    | QoSNotSupported
                    | UseAnotherServer
                    | ServerMoved
                    | ConnectionRateExceeded
            ),
            // §3.4.2.1, §3.5.2.1
            Carrier::PubAck | Carrier::PubRec => matches!(
                code,
                Success
                    | NoMatchingSubscribers
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicNameInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | PayloadFormatInvalid
            ),
            // §3.6.2.1, §3.7.2.1
            Carrier::PubRel | Carrier::PubComp => {
                matches!(code, Success | PacketIdentifierNotFound)
            }
            // §3.9.3
            Carrier::SubAck => matches!(
                code,
                Success
                    | GrantedQoS1
                    | GrantedQoS2
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | SharedSubscriptionsNotSupported
                    | SubscriptionIdentifiersNotSupported
                    | WildcardSubscriptionsNotSupported
            ),
            // §3.11.3
            Carrier::UnsubAck => matches!(
                code,
                Success
                    | NoSubscriptionExisted
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
            ),
            // §3.14.2.1
            Carrier::Disconnect => matches!(
                code,
                Success
                    | DisconnectWithWill
                    | UnspecifiedError
                    | MalformedPacket
                    | ProtocolError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | ServerBusy
                    | ServerShuttingDown
                    | KeepAliveTimeout
                    | SessionTakenOver
                    | TopicFilterInvalid
                    | TopicNameInvalid
                    | ReceiveMaximumExceeded
                    | TopicAliasInvalid
                    | PacketTooLarge
                    | MessageRateTooHigh
                    | QuotaExceeded
                    | AdministrativeAction
                    | PayloadFormatInvalid
                    | RetainNotSupported
                    | QoSNotSupported
                    | UseAnotherServer
                    | ServerMoved
                    | SharedSubscriptionsNotSupported
                    | ConnectionRateExceeded
                    | MaximumConnectTime
                    | SubscriptionIdentifiersNotSupported
                    | WildcardSubscriptionsNotSupported
            ),
            // §3.15.2.1
            Carrier::Auth => matches!(code, Success | ContinueAuthentication | ReAuthenticate),
        }
    }
}

/// What a reason code a plugin refused with becomes in `carrier` (the one mapping of
/// plugin codes, which are raw bytes in the contract): itself when it is an error code
/// MQTT 5 allows there, else 0x87 Not authorized.
pub fn plugin_refusal(code: u8, carrier: Carrier) -> ReasonCode {
    match ReasonCode::from_u8(code) {
        Some(r) if r.is_error() && carrier.allows(r) => r,
        _ => NotAuthorized,
    }
}

/// What a transform's `reject(code)` means for an MQTT 5 publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Answer a QoS 1/2 message with this PUBACK/PUBREC code; drop a QoS 0 one.
    Ack(ReasonCode),
    /// Disconnect the publisher with this DISCONNECT reason code.
    Disconnect(ReasonCode),
}

impl Rejection {
    /// An error code PUBACK allows is answered there; one only DISCONNECT allows
    /// disconnects (0x8B Server shutting down is the broker's own); anything else is 0x87
    /// in the acknowledgement.
    pub fn of(code: u8) -> Rejection {
        match ReasonCode::from_u8(code) {
            Some(r) if r.is_error() && Carrier::PubAck.allows(r) => Rejection::Ack(r),
            Some(r) if r.is_error() && r != ServerShuttingDown && Carrier::Disconnect.allows(r) => {
                Rejection::Disconnect(r)
            }
            _ => Rejection::Ack(NotAuthorized),
        }
    }
}

/// The MQTT 3.x CONNACK return code (MQTT 3.1.1 §3.2.2.3) for a reason code; `None` for a
/// code that is neither success nor an error. Errors 3.x cannot name map to the nearest:
/// refusals of the client to 5 (not authorized), credential problems to 4, the rest to 3
/// (server unavailable).
pub(super) fn connack_return_code(code: ReasonCode) -> Option<u8> {
    Some(match code {
        Success => 0,
        UnsupportedProtocolVersion => 1,
        ClientIdentifierNotValid => 2,
        ServerUnavailable => 3,
        BadUserNameOrPassword | BadAuthenticationMethod => 4,
        NotAuthorized | Banned => 5,
        c if c.is_error() => 3,
        _ => return None,
    })
}

/// The reason code for an MQTT 3.x CONNACK return code; `None` for reserved values 6–255.
pub(super) fn from_connack_return_code(rc: u8) -> Option<ReasonCode> {
    Some(match rc {
        0 => Success,
        1 => UnsupportedProtocolVersion,
        2 => ClientIdentifierNotValid,
        3 => ServerUnavailable,
        4 => BadUserNameOrPassword,
        5 => NotAuthorized,
        _ => return None,
    })
}

/// The MQTT 3.1.1 SUBACK return code (§3.9.3): granted QoS 0–2 or 0x80 for any failure.
pub(super) fn suback_return_code(code: ReasonCode) -> Option<u8> {
    match code {
        Success => Some(0),
        GrantedQoS1 => Some(1),
        GrantedQoS2 => Some(2),
        c if c.is_error() => Some(0x80),
        _ => None,
    }
}

/// The reason code for an MQTT 3.1.1 SUBACK return code; `None` for anything but 0, 1, 2
/// and 0x80.
pub(super) fn from_suback_return_code(rc: u8) -> Option<ReasonCode> {
    match rc {
        0 => Some(Success),
        1 => Some(GrantedQoS1),
        2 => Some(GrantedQoS2),
        0x80 => Some(UnspecifiedError),
        _ => None,
    }
}

#[cfg(test)]
mod plugin_codes {
    use super::*;

    /// The codes a plugin may refuse with, per packet, as the spec's tables list them.
    #[test]
    fn plugin_refusals_keep_the_codes_each_packet_allows() {
        let connack = [
            0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
            0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
        ];
        let suback = [0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
        let puback = [0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
        for code in 0..=255u8 {
            for (carrier, ok) in [
                (Carrier::ConnAck, &connack[..]),
                (Carrier::SubAck, &suback[..]),
                (Carrier::PubAck, &puback[..]),
            ] {
                let want = if ok.contains(&code) { code } else { 0x87 };
                assert_eq!(
                    plugin_refusal(code, carrier).code(),
                    want,
                    "{code:#x} in {carrier:?}"
                );
            }
        }
    }

    #[test]
    fn a_rejection_acknowledges_or_disconnects() {
        assert_eq!(Rejection::of(0x97), Rejection::Ack(QuotaExceeded));
        assert_eq!(
            Rejection::of(0x96),
            Rejection::Disconnect(MessageRateTooHigh)
        );
        assert_eq!(Rejection::of(0x8B), Rejection::Ack(NotAuthorized));
        assert_eq!(Rejection::of(0x00), Rejection::Ack(NotAuthorized));
        assert_eq!(Rejection::of(0x42), Rejection::Ack(NotAuthorized));
    }
}
